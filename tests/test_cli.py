"""The ``pushsvc`` command: the refusal to serve without keys (``dev``: tests/tools/test_dev.py),
and bad settings."""

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


def test_a_bad_setting_is_named_without_its_value_or_a_traceback() -> None:
    """Each bad variable is named with what is wrong; the value (a key, a password) is
    not echoed; exit 2, as for a bad flag."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}
    env |= {"PUSHSVC_API_KEYS": "secret-key-no-tenant", "PUSHSVC_JOB_TTL_S": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pushsvc", "worker"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.replace("│", " ").split())
    assert "PUSHSVC_API_KEYS must look like" in err and "PUSHSVC_JOB_TTL_S:" in err, err
    assert "secret-key-no-tenant" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
