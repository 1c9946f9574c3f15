#!/usr/bin/env python
"""Parameters and GFLOPs of every RevColV2 preset at 224x224 (fine-tuning mode, 1000 classes).

FLOPs follow the paper's convention (one multiply-add = one FLOP; fvcore). "GFLOPs" counts
every block (all levels of the last column, as the paper does); "GFLOPs run (cls)" counts
what a classification forward executes, where the levels that cannot reach the top level
of the last TD column are skipped.

    python tools/model_stats.py            # table
    python tools/model_stats.py --json     # [{"model": ..., "params_m": ..., "gflops": ..., "gflops_cls": ...}]
"""
import argparse
import json

import timm

import revcolv2  # noqa: F401
from revcolv2.flops import count_flops, count_params
from revcolv2.model import MODEL_CFGS

# supplementary Table 5 of the paper, where it gives a size
PAPER = {"revcolv2_base": (88.0, 19.0), "revcolv2_large": (327.0, 67.0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ap.add_argument("--img-size", type=int, default=224)
    args = ap.parse_args()
    rows = []
    for name in MODEL_CFGS:
        model = timm.create_model(name, num_classes=1000)
        rows.append({
            "model": name,
            "params_m": round(count_params(model), 3),
            "gflops": round(count_flops(model, args.img_size), 3),
            "gflops_cls": round(count_flops(model, args.img_size, executed=True), 3),
        })
        del model
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'model':<16}{'params (M)':>12}{'GFLOPs':>10}{'GFLOPs run (cls)':>18}{'paper params':>14}"
          f"{'paper GFLOPs':>14}")
    for r in rows:
        p = PAPER.get(r["model"])
        paper = f"{p[0]:>14.0f}{p[1]:>14.0f}" if p else f"{'-':>14}{'-':>14}"
        print(f"{r['model']:<16}{r['params_m']:>12.1f}{r['gflops']:>10.2f}{r['gflops_cls']:>18.2f}{paper}")


if __name__ == "__main__":
    main()
