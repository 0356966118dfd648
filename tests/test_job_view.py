"""``pushsvc.job_view``: ``apply_event`` on every golden case (pushsvc.js runs the same
ones: tests/browser/test_golden.py). ``JobTracker`` and ``diff_snapshots`` against a real
API: tests/test_client.py."""

from __future__ import annotations

from typing import Any

import pytest

from .golden import CASES, fold


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_python_client_applies_the_golden_case(case: dict[str, Any]) -> None:
    assert fold(case["events"]) == case["expect"], case["why"]
