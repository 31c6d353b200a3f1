#!/usr/bin/env bash
# Installs residtap and its test/plot extras into the current Python environment.
# torch: installs torch==2.13.0 only when no torch is importable; an existing torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "residtap install: no torch found, installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi
torch_before=$("$PY" -c "import torch; print(torch.__version__)")
stamp=.install-stamp
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import residtap" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
  echo "residtap install: torch changed from $torch_before to $torch_after; this must not happen" >&2
  exit 1
fi
