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
# Headless Chromium renders the demo report in tests/test_report_browser.py (skipped without it).
# Installed from Debian only as root with apt-get; a failure here never fails the install.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "residtap install: installing Debian's chromium (for the report browser test)"
    if ! { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; then
      echo "residtap install: note: could not install chromium; the browser test will skip"
    fi
  else
    echo "residtap install: note: no /usr/bin/chromium (needs root and apt-get to install);" \
         "the browser test will skip"
  fi
fi
