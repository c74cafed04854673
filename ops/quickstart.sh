#!/usr/bin/env bash
# The main job on one machine: install agentq into .venv, start the simulated Router (a test and
# demo tool standing in for the Hanzo Router), and run examples/quickstart.jsonl on the embedded
# Redis. Needs only Python >= 3.11 and pip. Pass another job file as $1 to run that instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e . \
  2> >(grep -v 'is ignored: it is neither' >&2) >/dev/null
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/agentq-simrouter --port "$PORT" > .venv/simrouter.log 2>&1 &
SIM=$!
trap 'kill $SIM 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q listening .venv/simrouter.log 2>/dev/null && break; sleep 0.1; done
export HANZO_ROUTER_URL="http://127.0.0.1:$PORT/v1"
unset REDIS_URL
.venv/bin/agentq run "${1:-examples/quickstart.jsonl}"
