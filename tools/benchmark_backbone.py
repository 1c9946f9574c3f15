#!/usr/bin/env python
"""Classification training step: RevColV2-B (reversible, plain) vs timm ViT-B/16 (with and
without ``set_grad_checkpointing()``), eager and compiled, in one invocation.

    python tools/benchmark_backbone.py --variant revcolv2_tiny --batch-sizes 2    # quick CPU check
    python tools/benchmark_backbone.py --device cpu --report                       # CPU, writes the current CPU table
    python tools/benchmark_backbone.py --device cuda --batch-sizes 128,512 --compile
    python tools/benchmark_backbone.py --device cuda --batch-sizes 128 --profile-dir runs/profile  # where time goes

The code is in :mod:`revcolv2_bench.backbone`; ``--help`` describes the rows, the columns
and the options.
"""
from revcolv2_bench.backbone import main

if __name__ == "__main__":
    main()
