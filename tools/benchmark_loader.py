#!/usr/bin/env python
"""Input pipelines (MIM, fine-tuning, COCO LSJ at 1024): images per second per loader worker,
against plain torchvision / timm / detectron2, and the workers one GPU needs.

    python tools/benchmark_loader.py                      # prints the table
    python tools/benchmark_loader.py --report             # ... and writes it to docs/BENCHMARKS.md

The code is in :mod:`revcolv2_bench.loader`; ``--help`` describes the rows and the options.
"""
from revcolv2_bench.loader import main

if __name__ == "__main__":
    main()
