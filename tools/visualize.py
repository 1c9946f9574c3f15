#!/usr/bin/env python
"""Draw a RevColV2 detectron2 model's predictions (or a dataset's ground truth) on images.

    python tools/visualize.py --config-file CFG --checkpoint model_final.pth --input imgs/ --output vis/
    python tools/visualize.py --dataset synthetic_shapes_val --output vis/

All options: ``--help``. The code is ``revcolv2_d2.visualization`` (shared with the demo and
the tests).
"""
from revcolv2_d2.known_warnings import ignore_known_harmless_warnings

ignore_known_harmless_warnings()  # before detectron2 is imported: some are raised at import

from revcolv2_d2.visualization import main  # noqa: E402

if __name__ == "__main__":
    main()
