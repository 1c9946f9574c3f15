#!/usr/bin/env python
"""Train / evaluate a RevColV2 detectron2 LazyConfig, the way detectron2 users know it.

The code is in :mod:`revcolv2_d2.train_net`; ``--help`` lists the options.
"""
from revcolv2_d2.known_warnings import ignore_known_harmless_warnings

ignore_known_harmless_warnings()  # before detectron2 is imported: some are raised at import

from revcolv2_d2.train_net import invoke_main  # noqa: E402

if __name__ == "__main__":
    invoke_main()
