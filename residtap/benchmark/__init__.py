"""What residtap costs, measured: the reference model and the runtime-probe benchmark.

    from residtap.benchmark import BenchConfig, bench_probes, reference_model
    result = bench_probes(BenchConfig.quick())     # JSON-ready: rows, config, environment
    model = reference_model()                      # the random 8-layer d_model 512 Llama

readouts.py measures attention probes and SAE features the same way (`residtap bench
readouts`). `residtap bench probes` (residtap/cli/bench.py) prints and plots these results and
`residtap cost --measure` uses `measure_overhead`; the scripts in bench/ build their models with
`reference_model` too. The naive baseline (one Python forward hook per probe) registers hooks of
its own, which no module of the package does, so it lives outside it, in bench/naive.py.
"""

from residtap.benchmark.probes import (
           VARIANTS,
           BenchConfig,
           bench_compiled,
           bench_probes,
           measure_overhead,
)
from residtap.benchmark.readouts import ReadoutConfig, bench_readouts
from residtap.benchmark.reference import forward_flops_per_token, random_bank, reference_model

__all__ = ["VARIANTS", "BenchConfig", "ReadoutConfig", "bench_compiled", "bench_probes",
           "bench_readouts", "forward_flops_per_token", "measure_overhead", "random_bank",
           "reference_model"]
