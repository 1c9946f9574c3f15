#!/usr/bin/env python
"""Mask R-CNN: RevColV2-B (reversible, plain) vs detectron2's ViTDet-B, in one run.

    python tools/benchmark_detection.py                      # CUDA: 1024x1024, batch 2, bf16
    python tools/benchmark_detection.py --device cpu         # CPU: 256x256, batch 2, fp32
    python tools/benchmark_detection.py --device cpu --report  # ... and writes it to docs/BENCHMARKS.md

Targets on a GPU: training step <= 1.2x ViTDet-B's time, reversible peak memory <= ViTDet-B's,
inference >= 0.8x ViTDet-B's img/s. The code is in :mod:`revcolv2_bench.detection`;
``--help`` describes what is measured and the options.
"""
from revcolv2_bench.detection import main

if __name__ == "__main__":
    main()
