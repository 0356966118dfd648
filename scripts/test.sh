#!/usr/bin/env bash
# Install what the tests need (system packages, a venv, the project) and run them all.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)  # browser tests (Playwright drives it)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "please install: ${need_apt[*]} (e.g. sudo apt-get install -y ${need_apt[*]})" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/ruff check pushsvc tests
.venv/bin/mypy
# Two processes, each test file whole on one of them (its module fixtures start once);
# each process has its own Redis, ports are reserved across them (tests/procs.free_port).
# Arguments after the script's name override these: `bash scripts/test.sh -n 0 tests/x.py`.
.venv/bin/pytest -n 2 --dist loadfile "$@"
