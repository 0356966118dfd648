"""The ``pushsvc`` command: the refusal to serve without keys (``dev``: tests/tools/test_dev.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from pushsvc.guard import is_loopback

from .procs import ROOT, free_port


def test_api_refuses_a_public_address_without_keys() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pushsvc", "api", "--host", "0.0.0.0", "--port", str(free_port())],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "PUSHSVC_API_KEYS" in proc.stderr


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
