#!/usr/bin/env python
"""Linear probing of a MIM-pre-trained RevColV2 (paper Table 5, MAE's protocol).

The code is in :mod:`revcolv2.cli.linear_probe`; ``--help`` lists the options."""
from revcolv2.cli.linear_probe import main

if __name__ == "__main__":
    main()
