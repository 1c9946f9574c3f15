#!/usr/bin/env python
"""Linear CKA of every column's every level of a checkpoint against the input pixels, the
patch embedding and the last top level: heatmaps and JSON.

    python tools/analyze_levels.py --checkpoint CKPT --data images/ --output cka/

The code is in :mod:`revcolv2.cli.analyze_levels`; ``--help`` lists the options."""
from revcolv2.cli.analyze_levels import main

if __name__ == "__main__":
    main()
