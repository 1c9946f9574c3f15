#!/usr/bin/env python
"""Train / evaluate a RevColV2 detectron2 LazyConfig, the way detectron2 users know it.

The code is in :mod:`revcolv2_d2.train_net`; ``--help`` lists the options.
"""
from revcolv2_d2.train_net import invoke_main

if __name__ == "__main__":
    invoke_main()
