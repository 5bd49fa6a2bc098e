#!/usr/bin/env bash
# Shared set-up for ./lore-service and ./run-tests: a project virtualenv with
# the runtime and test dependencies, created on first use, refreshed when
# pyproject.toml changes. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORE_SERVICE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: lore-service needs Python 3.11 or newer as '$PY'" >&2
  echo "hint: install python3 (3.11+), or set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
stamp="$VENV/.deps-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ ! -e "$stamp" ]; then
  echo "setting up $VENV (first use or dependencies changed)..." >&2
  "$PY" -m venv "$VENV"
  log="$VENV/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[test]"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "error: installing the Python dependencies failed (full log: $log)" >&2
    exit 6
  fi
  rm -f "$VENV"/.deps-*
  touch "$stamp"
fi
