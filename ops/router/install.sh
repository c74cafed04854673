#!/usr/bin/env bash
# Installs the LiteLLM proxy (the gateway the Hanzo Router is forked from) into .venv-router/
# at the repo root, pinned by ops/router/requirements.txt. Idempotent: a stamp holding the
# requirements' hash makes a second run a fast no-op. Prints one line of status.
#
#   ./ops/router/install.sh
#   .venv-router/bin/litellm --config ops/router/config.yaml --port 4000
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
VENV=.venv-router
REQ=ops/router/requirements.txt
STAMP=$VENV/.installed-requirements.sha256

if grep -Eiq '^litellm[[:space:]]*==[[:space:]]*1\.107\.0([^0-9.]|$)' "$REQ"; then
  echo "router: refusing to install litellm 1.107.0 (a compromised release); fix $REQ" >&2
  exit 1
fi
want=$( { sha256sum "$REQ"; "$PY" -c 'import sys; print(sys.version_info[:2])'; } \
  | sha256sum | cut -d' ' -f1)
version=$(sed -n 's/^litellm==\([^[:space:]#]*\).*/\1/p' "$REQ")

if [ -x "$VENV/bin/litellm" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  echo "router: litellm $version already installed in $VENV"
  exit 0
fi

# Not installed, or from other requirements or another Python: start from a clean venv, so no
# package from an older pin set lingers.
start=$SECONDS
rm -rf "$VENV"
"$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"  # never committed
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ" \
  2> >(grep -v 'is ignored: it is neither' >&2) >/dev/null
got=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("litellm"))')
if [ "$got" = "1.107.0" ] || [ "$got" != "$version" ]; then
  echo "router: expected litellm $version in $VENV, found $got" >&2
  exit 1
fi
echo "$want" > "$STAMP"
size=$(du -sh "$VENV" | cut -f1)
echo "router: installed litellm $got into $VENV in $((SECONDS - start)) s ($size)"
