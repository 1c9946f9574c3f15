#!/usr/bin/env python
"""``torchrun`` that exits 143 / 130 with one line when a signal stops the run (``torchrun``
itself exits 1 with a traceback), for the classification tools.

The code is in :mod:`revcolv2.cli.torchrun`; every ``torchrun`` option works.
"""
from revcolv2.cli.torchrun import main

if __name__ == "__main__":
    main()
