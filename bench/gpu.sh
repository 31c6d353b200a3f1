#!/usr/bin/env bash
# The device run of issue 19 (bench/GPU.md): install residtap from this checkout, check the
# imports, print versions, then run bench/bench_gpu.py with time caps (<= 9 min on an H200).
#
#   bash bench/gpu.sh OUT                 # writes OUT/bench_gpu.json, OUT/bench_gpu.log, OUT/gpu_sh.log
#   bash bench/gpu.sh OUT --smoke         # the same code on a tiny CPU model (no install; tests)
#   bash bench/gpu.sh OUT --sections setup,lens --graph-backend cudagraphs   # any bench_gpu.py option
#
# No network is needed: the install is `pip install --no-deps --no-build-isolation --no-index
# -e .` (the machine's own setuptools builds it; its torch and transformers are used as they
# are); if it fails, the checkout is used through PYTHONPATH, which is always set.
set -uo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash bench/gpu.sh OUT_DIR [--smoke] [bench_gpu.py options]" >&2
  exit 2
fi
OUT=$1
shift
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
LIMIT=${BENCH_LIMIT_S:-540}  # the whole script, install included
SMOKE=0
for arg in "$@"; do
  if [ "$arg" = "--smoke" ]; then SMOKE=1; fi
done

main() {
  echo "== bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd), out $OUT"
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /' || true
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu \
      --format=csv || true
  fi
  if [ "$SMOKE" = 0 ]; then
    # setuptools builds the editable install offline; older setuptools also need `wheel`
    "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)" || true
    "$PY" -c "import wheel; print('wheel', wheel.__version__)" 2>/dev/null || echo "no wheel package"
    if "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e .; then
      echo "installed residtap (editable, no dependencies)"
    else
      echo "pip install failed; using the checkout through PYTHONPATH"
    fi
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  if ! "$PY" - <<'EOF'
import sys

import torch
import transformers

import residtap
import residtap.benchmark
import residtap.cli.bench
import residtap.cost
import residtap.lens
import residtap.probes.bank
import residtap.steering
import residtap.store

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__)
print("residtap", residtap.__version__, "from", residtap.__file__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
  then
    echo "import check failed: see above" >&2
    return 3
  fi
  left=$((LIMIT - SECONDS))
  if [ "$left" -lt 60 ]; then left=60; fi  # (`timeout 0` would mean no limit at all)
  echo "== bench_gpu.py ($left s left of $LIMIT)"
  timeout -k 15 "$left" "$PY" bench/bench_gpu.py "$OUT" "$@"
  rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "bench_gpu.py was stopped at the script's limit ($LIMIT s); bench_gpu.json holds what it finished"
  fi
  echo "== done in $SECONDS s (rc $rc)"
  return $rc
}

main "$@" 2>&1 | tee "$OUT/gpu_sh.log"
exit "${PIPESTATUS[0]}"
