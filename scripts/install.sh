#!/usr/bin/env bash
# Installs residtap into the current Python environment, at the versions in constraints/lock.txt.
#   scripts/install.sh runtime   residtap + plots: what `make demo` needs, nothing more
#   scripts/install.sh dev       + the test tools, and Debian's Chromium (as root) for the
#                                report browser test: what `make test` needs
# torch: torch==2.13.0 (CPU) is installed only when no torch is installed. An installed torch
# is kept: its exact version is handed to pip as a constraint before anything is installed,
# so pip fails rather than replace it. The plan is printed first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-dev}
case "$MODE" in
  runtime) EXTRAS=plots ;;
  dev) EXTRAS=dev ;;
  *) echo "usage: scripts/install.sh runtime|dev (got '$MODE')" >&2; exit 2 ;;
esac
# pip show, not `import torch`: importing torch before NumPy is installed prints a warning
torch_version=$("$PY" -m pip show torch 2>/dev/null | sed -n 's/^Version: //p' || true)
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
cp constraints/lock.txt "$pins"
if [ -z "$torch_version" ]; then
  echo "residtap install: no torch installed: torch==2.13.0 (CPU) first, then residtap[$EXTRAS]"
  echo "torch==2.13.0" >> "$pins"
else
  echo "residtap install: torch $torch_version is installed and is kept (pinned for pip);" \
       "residtap[$EXTRAS] at the versions in constraints/lock.txt"
  echo "torch==$torch_version" >> "$pins"
fi
stamp=".install-stamp-$MODE"
want="$(cat pyproject.toml constraints/lock.txt scripts/install.sh | sha256sum | cut -d' ' -f1)"
want="$want torch=$torch_version"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import residtap" 2>/dev/null
then
  echo "residtap install: already installed ($MODE)"
else
  if [ -z "$torch_version" ]; then
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  "$PY" -m pip install -q -c "$pins" -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
if [ -n "$torch_version" ]; then
  after=$("$PY" -m pip show torch | sed -n 's/^Version: //p')
  if [ "$after" != "$torch_version" ]; then
    echo "residtap install: torch changed from $torch_version to $after; this must not happen" >&2
    exit 1
  fi
fi
# Headless Chromium renders the demo report in tests/test_report_browser.py (skipped without
# it). Test set-up only; installed from Debian as root; a failure here never fails the install.
if [ "$MODE" = dev ] && [ ! -x /usr/bin/chromium ]; then
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
