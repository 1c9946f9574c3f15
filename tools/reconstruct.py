#!/usr/bin/env python
"""Reconstructions of a MIM checkpoint for any images, drawn as pre-training's grids.

    python tools/reconstruct.py --checkpoint CKPT photo.jpg folder/ --output recon/

The code is in :mod:`revcolv2.cli.reconstruct`; ``--help`` lists the options."""
from revcolv2.cli.reconstruct import main

if __name__ == "__main__":
    main()
