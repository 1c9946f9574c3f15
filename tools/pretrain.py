#!/usr/bin/env python
"""Masked image modeling pre-training of RevColV2 (paper Table 1).

The code is in :mod:`revcolv2.cli.pretrain`; ``--help`` lists the options."""
from revcolv2.cli.pretrain import main

if __name__ == "__main__":
    main()
