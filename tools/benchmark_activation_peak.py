#!/usr/bin/env python
"""Activation peak of a reversible RevColV2 training step in three gradient regimes (the
benchmarks' analysis step, a plain accumulation loop, fresh gradients), with the last
update's graph retained where the engine decides to and never.

    python tools/benchmark_activation_peak.py                       # RevColV2-B, batches 2 and 6, CPU
    python tools/benchmark_activation_peak.py --batch-sizes 32,64

The code is in :mod:`revcolv2_bench.activation_peak`; ``--help`` describes the regimes.
"""
from revcolv2_bench.activation_peak import main

if __name__ == "__main__":
    main()
