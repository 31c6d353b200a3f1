"""Probe-readout benchmark: the same code as `residtap bench probes` (see its --help).

    python bench/bench_probes.py --out bench/results          # reference config
    python bench/bench_probes.py --quick --json               # seconds
"""

from __future__ import annotations

import sys

from residtap.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "probes", *sys.argv[1:]]))
