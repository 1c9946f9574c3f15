#!/usr/bin/env python
"""Main job (interim): build RevColV2-B, print its size table, run one reversible training step on CPU."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import revcolv2  # noqa: E402,F401
from revcolv2.flops import count_flops, count_params  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", default="output/demo")
    args = ap.parse_args()
    os.makedirs(args.output, exist_ok=True)
    print(f"{'model':<16}{'params (M)':>12}{'GFLOPs@224':>12}")
    for name in ("revcolv2_tiny", "revcolv2_base", "revcolv2_large"):
        m = timm.create_model(name)
        print(f"{name:<16}{count_params(m):>12.1f}{count_flops(m):>12.2f}")
    model = timm.create_model("revcolv2_base", reversible=True, drop_path_rate=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([1, 2])
    t = time.time()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    print(f"one reversible training step of revcolv2_base (batch 2, 224x224, CPU): "
          f"loss {loss.item():.4f}, {time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
