#!/usr/bin/env python
"""Classification fine-tuning of RevColV2 (paper Tables 2-4 and the supervised baseline).

The code is in :mod:`revcolv2.cli.finetune`; ``--help`` lists the options."""
from revcolv2.cli.finetune import main

if __name__ == "__main__":
    main()
