#!/usr/bin/env bash
# Rebuild the bundled model organism from scratch: data sets, then the checkpoint (CPU, ~15 min).
# Usage: bash scripts/train_organism.sh [OUT_DIR]   (default: residtap/organism/model)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-residtap/organism/model}"
python -m residtap.organism.build_data --out residtap/organism/data
python -m residtap.organism.train --out "$OUT" --steps 1500 --seed 0 --threads 1
python -m residtap.organism.evaluate --model "$OUT"
