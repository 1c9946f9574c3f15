#!/usr/bin/env python
"""Every GPU target of the reversible engine, measured in one command (``--budget-s``, 450 s
by default, bounds it), with the op chains that show where the time goes.

    python tools/benchmark_gpu_targets.py --out runs/gpu-targets            # prints the targets
    python tools/benchmark_gpu_targets.py --out runs/gpu-targets --report   # ... and docs/BENCHMARKS.md

The code is in :mod:`revcolv2_bench.gpu_targets`; ``--help`` lists the steps, the targets
and the options.
"""
from revcolv2_bench.gpu_targets import main

if __name__ == "__main__":
    main()
