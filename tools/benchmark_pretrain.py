#!/usr/bin/env python
"""MIM pre-training step: RevColV2-B (reversible, plain) vs MAE ViT-B/16, eager and compiled.

    python tools/benchmark_pretrain.py --variant revcolv2_tiny --batch-sizes 2     # quick CPU check
    python tools/benchmark_pretrain.py --device cpu --report                        # CPU, writes the current CPU table
    python tools/benchmark_pretrain.py --device cuda --batch-sizes 256 --compile

The code is in :mod:`revcolv2_bench.pretrain`; ``--help`` describes the rows, the columns
and the options.
"""
from revcolv2_bench.pretrain import main

if __name__ == "__main__":
    main()
