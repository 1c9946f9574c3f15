#!/usr/bin/env python
"""Parameters and GFLOPs of every RevColV2 preset at 224x224 (fine-tuning mode, 1000 classes).

FLOPs follow the paper's convention (one multiply-add = one FLOP; fvcore). Two sizes per
preset:

- "params" / "GFLOPs": every block of every column (``out_levels='all'``, as the paper counts
  and as the detectron2 backbone and MIM model build it);
- "params built" / "GFLOPs (cls)": the classifier ``timm.create_model(name)`` builds and runs.
  It reads the top level of the last TD column only, and does not build the levels that
  cannot reach it (levels 0-2 of the last TD column; with 2 TD columns also levels 0-1 of
  the one before).

    python tools/model_stats.py            # table
    python tools/model_stats.py --json     # [{"model", "params_m", "gflops", "params_built_m", "gflops_cls"}]
"""
import argparse
import json

import timm

import revcolv2  # noqa: F401
from revcolv2.model import MODEL_CFGS
from revcolv2_bench.flops import count_flops, count_params

# supplementary Table 5 of the paper, where it gives a size
PAPER = {"revcolv2_base": (88.0, 19.0), "revcolv2_large": (327.0, 67.0)}


def sizes(name: str, img_size: int = 224) -> dict:
    """The paper-counted size (all blocks) and the classifier's, of preset ``name``."""
    full = timm.create_model(name, num_classes=1000, out_levels="all")
    row = {"model": name, "params_m": round(count_params(full), 3), "gflops": round(count_flops(full, img_size), 3)}
    del full
    built = timm.create_model(name, num_classes=1000)
    row.update(params_built_m=round(count_params(built), 3), gflops_cls=round(count_flops(built, img_size), 3))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ap.add_argument("--img-size", type=int, default=224)
    args = ap.parse_args()
    rows = [sizes(name, args.img_size) for name in MODEL_CFGS]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'model':<16}{'params (M)':>12}{'GFLOPs':>10}{'params built':>14}{'GFLOPs (cls)':>14}"
          f"{'paper params':>14}{'paper GFLOPs':>14}")
    for r in rows:
        p = PAPER.get(r["model"])
        paper = f"{p[0]:>14.0f}{p[1]:>14.0f}" if p else f"{'-':>14}{'-':>14}"
        print(f"{r['model']:<16}{r['params_m']:>12.1f}{r['gflops']:>10.2f}{r['params_built_m']:>14.1f}"
              f"{r['gflops_cls']:>14.2f}{paper}")


if __name__ == "__main__":
    main()
