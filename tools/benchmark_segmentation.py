#!/usr/bin/env python
"""ADE20K heads: RevColV2-B UperNet vs RevColV2-B Mask2Former at 512x512, in one run.

    python tools/benchmark_segmentation.py                      # CUDA: batch 8, bf16
    python tools/benchmark_segmentation.py --device cpu         # CPU: batch 2, fp32 (UperNet's BN needs 2)
    python tools/benchmark_segmentation.py --device cpu --report  # ... and writes it to docs/BENCHMARKS.md

Target on a GPU: Mask2Former's training step <= 2.0x UperNet's. The code is in
:mod:`revcolv2_bench.segmentation`; ``--help`` describes what is measured and the options.
"""
from revcolv2_bench.segmentation import main

if __name__ == "__main__":
    main()
