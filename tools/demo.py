#!/usr/bin/env python
"""Main job: a RevColV2 Mask R-CNN learns the built-in shapes dataset on this CPU (``make demo``).

The code is in :mod:`revcolv2_d2.demo`; ``--help`` lists the options.
"""
import sys

from revcolv2_d2.known_warnings import ignore_known_harmless_warnings

ignore_known_harmless_warnings()  # before detectron2 is imported: some are raised at import

from revcolv2_d2.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
