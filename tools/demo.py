#!/usr/bin/env python
"""Main job: a RevColV2 Mask R-CNN learns the built-in shapes dataset on this CPU (``make demo``).

The code is in :mod:`revcolv2_d2.demo`; ``--help`` lists the options.
"""
import sys

from revcolv2_d2.demo import main

if __name__ == "__main__":
    sys.exit(main())
