#!/usr/bin/env bash
# Regenerates constraints/lock.txt: resolve residtap[dev] in a fresh venv (torch==2.13.0 first)
# and keep every version except torch and what only torch needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip freeze > "$venv.torch"
"$venv/bin/python" -m pip install -q -e ".[dev]"
{
  echo "# Exact versions 'make test' / 'make demo' install (pip constraints: only what is asked for"
  echo "# is installed, at these versions). Resolved from a fresh venv on $(date +%F) with"
  echo "# 'pip install torch==2.13.0' then 'pip install -e .[dev]'. torch and the packages only torch"
  echo "# needs are left out on purpose: an installed torch is never replaced (scripts/install.sh)."
  echo "# Regenerate: bash scripts/lock.sh"
  "$venv/bin/python" -m pip freeze | grep -v -e '^-e' -e '^residtap' | grep -v -x -F -f "$venv.torch"
} > constraints/lock.txt
echo "wrote constraints/lock.txt"
