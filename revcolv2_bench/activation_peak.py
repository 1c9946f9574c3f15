"""Activation peak of a reversible RevColV2 training step in three gradient regimes, with the
last update's graph retained where the engine decides to (the default) and never
(``retain_last_graph=False``).

Every figure is (peak at the larger batch - peak at the smaller) / (difference), in MB per
image, from ``revcolv2_bench.memory.LiveBytes``: RevColV2 classifier, drop path 0.1, bf16
autocast, cross-entropy. Regimes:

  analysis      the benchmarks' analysis step (``revcolv2_bench.analysis``):
                forward + backward with the inputs made inside the measured step, after a
                warm-up step, no ``zero_grad``: the gradients are held
  accumulation  a plain accumulation loop: ``zero_grad(set_to_none=True)``, a first
                micro-batch, then the second one measured (gradients held)
  fresh         ``zero_grad(set_to_none=True)``, then one measured forward + backward (the
                backward allocates the gradients)

Each row also gives the peak at each batch size (MB) and where it falls (forward or backward,
and the op).

    python tools/benchmark_activation_peak.py                       # RevColV2-B, batches 2 and 6, CPU
    python tools/benchmark_activation_peak.py --batch-sizes 32,64
"""
import argparse

import timm
import torch
import torch.nn.functional as F

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.amp import autocast
from revcolv2_bench.memory import LiveBytes


class _WhereLive(LiveBytes):
    """:class:`LiveBytes` that also records the phase and op at which the peak was reached."""

    def __init__(self, phase):
        super().__init__()
        self.phase, self.at = phase, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.peak
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.peak > before:
            self.at = f"{self.phase[0]} {func.overloadpacket.__name__}"
        return out


def main():
    ap = argparse.ArgumentParser(prog="tools/benchmark_activation_peak.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="revcolv2_base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-sizes", default="2,6", help="two batch sizes, comma-separated")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    small, large = (int(b) for b in args.batch_sizes.split(","))
    phase = ["forward"]

    def batch(b, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, 3, args.img_size, args.img_size, generator=g)
        return x.to(args.device), torch.randint(0, 1000, (b,), generator=g).to(args.device)

    def step(model, b, seed, inputs_inside=False):
        phase[0] = "forward"
        x, y = batch(b, seed) if inputs_inside else inputs[(b, seed)]
        with autocast(args.device, "bf16", cuda_only=False):
            loss = F.cross_entropy(model(x), y)
        phase[0] = "backward"
        loss.backward()

    def measured(fn):
        with _WhereLive(phase) as m:
            fn()
        return m

    def analysis(model, b):
        return measured(lambda: step(model, b, 0, inputs_inside=True))

    def accumulation(model, b):
        model.zero_grad(set_to_none=True)
        step(model, b, 1)
        return measured(lambda: step(model, b, 2))

    def fresh(model, b):
        model.zero_grad(set_to_none=True)
        return measured(lambda: step(model, b, 2))

    inputs = {(b, s): batch(b, s) for b in (small, large) for s in (0, 1, 2)}
    print(f"{args.variant}, {args.img_size}x{args.img_size}, bf16 autocast, batches {small} and {large}")
    print(f"{'regime':<13} {'last graph':<14} {'MB/img':>7}  peak (MB) at batch {small} / {large}, and where")
    for regime in (analysis, accumulation, fresh):
        for retain in (True, False):
            torch.manual_seed(0)
            model = timm.create_model(args.variant, img_size=args.img_size, drop_path_rate=0.1, reversible=True)
            model = model.to(args.device).train()
            model.retain_last_graph = retain
            step(model, small, 0, inputs_inside=True)  # warm-up
            runs = {b: regime(model, b) for b in (small, large)}
            per_image = (runs[large].peak - runs[small].peak) / (large - small) / 2 ** 20
            print(f"{regime.__name__:<13} {'engine decides' if retain else 'rebuilt':<14} {per_image:7.2f}  "
                  f"{runs[small].peak / 2 ** 20:.1f} / {runs[large].peak / 2 ** 20:.1f}, "
                  f"{runs[small].at} / {runs[large].at}")


if __name__ == "__main__":
    main()
