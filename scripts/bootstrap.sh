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
# the stamp names the dependencies and the interpreter: either changing rebuilds
want="$("$PY" -c 'import sys; print(sys.version)')"
stamp="$VENV/.deps-$( { cat "$ROOT/pyproject.toml"; echo "$want"; } | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ ! -e "$stamp" ]; then
  echo "setting up $VENV (first use, or dependencies or Python changed)..." >&2
  clear=()
  # a venv made by another interpreter cannot be upgraded in place (its stdlib is gone)
  if [ -e "$VENV/pyvenv.cfg" ] && [ "$("$VENV/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null)" != "$want" ]; then
    clear=(--clear)
  fi
  if ! "$PY" -m venv "${clear[@]}" "$VENV"; then
    # Debian's own python3 makes a virtualenv only with python3-venv installed
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s python3-venv >/dev/null 2>&1; then
      echo "installing python3-venv..." >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
    fi
    if ! "$PY" -m venv --clear "$VENV"; then
      echo "error: '$PY -m venv' failed" >&2
      echo "hint: on Debian/Ubuntu: sudo apt-get install python3-venv" >&2
      exit 6
    fi
  fi
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
