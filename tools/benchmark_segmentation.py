#!/usr/bin/env python
"""ADE20K heads: RevColV2-B UperNet vs RevColV2-B Mask2Former at 512x512, in one run.

Both models are built from their LazyConfigs with nothing changed but UperNet's SyncBN
(plain BN in one process):
- UperNet: ``projects/RevColV2/configs/ADE20K/upernet_revcolv2_b_160k.py`` (512x512 is one
  sliding window);
- Mask2Former: ``projects/RevColV2/configs/ADE20K/mask2former_revcolv2_b_160k.py`` (100
  queries, 9 masked-attention layers, 6-layer deformable pixel decoder, 12544-point losses
  with deep supervision), whole-image inference.

A training step is forward (losses on a synthetic 512x512 label map of 12 classes) +
backward + AdamW step; inference is a no-grad forward with post-processing to per-class
scores, both on the same batch. On CUDA they run under bf16 autocast and peak memory is
``torch.cuda.max_memory_allocated`` (weights, gradients and AdamW state included). On CPU
(fp32) memory is what autograd saves for backward in one training forward (saved-tensor
hooks, each storage once, parameters left out) and the profiler's peak of tensor bytes that
forward + backward add. Mask2Former's multi-scale deformable attention runs through the
``transformers`` PyTorch path (``grid_sample`` per level, no custom kernel): its cost is
measured by timing forward + backward of that function on the exact tensors of one training
forward (6 encoder layers), and reported as ms per step and share of the step. Each model
runs in its own subprocess.

    python tools/benchmark_segmentation.py                      # CUDA: batch 8, bf16
    python tools/benchmark_segmentation.py --device cpu         # CPU: batch 2, fp32 (UperNet's BN needs 2)
    python tools/benchmark_segmentation.py --device cpu --report  # ... and append the table to docs/BENCHMARKS.md

Target on a GPU: Mask2Former's training step <= 2.0x UperNet's.
"""
import json
import os
import sys
import time

import torch

from revcolv2.amp import autocast

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = ["RevColV2-B UperNet", "RevColV2-B Mask2Former"]
CONFIGS = {
    "RevColV2-B UperNet": os.path.join(_ROOT, "projects", "RevColV2", "configs", "ADE20K", "upernet_revcolv2_b_160k.py"),
    "RevColV2-B Mask2Former": os.path.join(_ROOT, "projects", "RevColV2", "configs", "ADE20K",
                                           "mask2former_revcolv2_b_160k.py"),
}
NUM_CLASSES = 150


def build(label: str) -> torch.nn.Module:
    from detectron2.config import LazyConfig, instantiate

    model = LazyConfig.load(CONFIGS[label]).model
    if "norm" in model.sem_seg_head:
        model.sem_seg_head.norm = "BN"  # one process
    return instantiate(model)


def synthetic_batch(batch: int, size: int, device: str, with_targets: bool):
    """``batch`` images (0-255) with 16x16-cell label maps of 12 classes each, seeded."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        record = {"image": (torch.rand(3, size, size, generator=g) * 255).to(device), "height": size, "width": size}
        if with_targets:
            classes = torch.randperm(NUM_CLASSES, generator=g)[:12]
            cells = classes[torch.randint(0, 12, (16, 16), generator=g)]
            record["sem_seg"] = cells.repeat_interleave(size // 16, 0).repeat_interleave(size // 16, 1).to(device)
        out.append(record)
    return out


class _MSDACalls:
    """Records the inputs of every multi-scale deformable attention call inside ``with``."""

    def __enter__(self):
        from transformers.models.mask2former import modeling_mask2former as hf

        self.module, self.original, self.calls = hf, hf.multi_scale_deformable_attention, []

        def recording(value, shapes, locations, weights):
            self.calls.append((value.detach(), list(shapes), locations.detach(), weights.detach()))
            return self.original(value, shapes, locations, weights)

        hf.multi_scale_deformable_attention = recording
        return self

    def __exit__(self, *exc):
        self.module.multi_scale_deformable_attention = self.original


def msda_seconds(calls, device: str, repeats: int) -> float:
    """Forward + backward seconds of the PyTorch deformable-attention path for all ``calls``."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    cuda = device.startswith("cuda")
    inputs = [(v.clone().requires_grad_(), s, loc.clone().requires_grad_(), w.clone().requires_grad_())
              for v, s, loc, w in calls]

    def once():
        for v, s, loc, w in inputs:
            multi_scale_deformable_attention(v, s, loc, w).sum().backward()

    once()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def worker(args) -> dict:
    from detectron2.utils.events import EventStorage

    from bench_common import SavedActivations, cpu_peak_bytes, timed

    device, cuda = args.device, args.device.startswith("cuda")
    torch.manual_seed(0)
    model = build(args.worker).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    train_batch = synthetic_batch(args.batch, args.size, device, with_targets=True)
    test_batch = synthetic_batch(args.batch, args.size, device, with_targets=False)
    is_m2f = "Mask2Former" in args.worker

    def losses():
        with autocast(device, "bf16"):
            return sum(model(train_batch).values())

    def train_step():
        losses().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer():
        with autocast(device, "bf16"):
            model(test_batch)

    out = {"params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "head params (M)": round(sum(p.numel() for p in model.sem_seg_head.parameters()) / 1e6, 1)}
    with EventStorage(0):
        model.train()
        train_step()  # allocate the optimizer state before measuring
        if is_m2f:
            with _MSDACalls() as recorder:
                with SavedActivations(model) as saved:
                    loss = losses()
        else:
            with SavedActivations(model) as saved:
                loss = losses()
        loss.backward()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sec, cpu_sec = timed(train_step, device, args.warmup, args.iters)
        out.update({"train s/step": round(sec, 3), "saved activations (MB)": round(saved.total / 2 ** 20, 1)})
        if not cuda:
            out["train CPU-s/step"] = round(cpu_sec, 2)
            losses().backward()  # gradient buffers exist (and stay) from here on
            opt.zero_grad(set_to_none=False)
            out["fwd+bwd adds (MB)"] = round(cpu_peak_bytes(lambda: losses().backward()) / 2 ** 20, 1)
        else:
            out["train peak GPU mem (GiB)"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        if is_m2f:
            with autocast(device, "bf16"):
                ms = msda_seconds(recorder.calls, device, max(1, args.iters))
            out["MSDA calls/step"] = len(recorder.calls)
            out["MSDA fwd+bwd ms/step"] = round(ms * 1000, 1)
            out["MSDA share of step"] = f"{100 * ms / sec:.1f}%"

        model.eval()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sec, cpu_sec = timed(infer, device, args.warmup, args.iters)
        out["infer img/s"] = round(args.batch / sec, 2)
        if not cuda:
            out["infer img/CPU-s"] = round(args.batch / cpu_sec, 3)
        else:
            out["infer peak GPU mem (GiB)"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def main():
    from bench_common import benchmark_parser, fill_device_defaults

    ap = benchmark_parser(__doc__, MODELS)
    ap.add_argument("--size", type=int, default=512, help="square input side (the ADE20K crop)")
    args = ap.parse_args()
    cuda = fill_device_defaults(args, batch=(2, 8), warmup=(1, 3), iters=(2, 10))

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    from bench_common import append_report, markdown_table, run_workers

    rows = run_workers(__file__, MODELS, ["--batch", args.batch, "--size", args.size, "--warmup", args.warmup,
                                          "--iters", args.iters, "--device", args.device], "benchmark_segmentation")
    upernet, m2f = rows
    # on a CPU the ratios use process CPU time, which other load on the machine does not inflate
    step = "train s/step" if cuda else "train CPU-s/step"
    speed = "infer img/s" if cuda else "infer img/CPU-s"
    mem = "train peak GPU mem (GiB)" if cuda else "fwd+bwd adds (MB)"
    for r in rows:
        r["train time vs UperNet"] = f"{r[step] / upernet[step]:.2f}x"
        r["train memory vs UperNet"] = f"{r[mem] / upernet[mem]:.2f}x"
        r["infer vs UperNet"] = f"{r[speed] / upernet[speed]:.2f}x"
    cols = ["model", "params (M)", "head params (M)", "train s/step"] + ([] if cuda else ["train CPU-s/step"])
    cols += ["train time vs UperNet", "saved activations (MB)", mem, "train memory vs UperNet"]
    cols += ["MSDA calls/step", "MSDA fwd+bwd ms/step", "MSDA share of step"]
    cols += ["infer img/s"] + ([] if cuda else ["infer img/CPU-s"]) + ["infer vs UperNet"]
    cols += ["infer peak GPU mem (GiB)"] if cuda else []
    table = markdown_table(rows, cols)

    ratio = m2f[step] / upernet[step]
    verdict = (f"Target (GPU): Mask2Former training step <= 2.0x UperNet's -> {ratio:.2f}x "
               f"({'met' if ratio <= 2.0 else 'NOT met'}).")
    precision = "bf16 autocast" if cuda else "fp32"
    body = (
        f"ADE20K heads on RevColV2-B, {args.size}x{args.size}, batch {args.batch}, {precision}, "
        f"{args.warmup} warm-up + {args.iters} timed steps / inference batches. \"MSDA\" is Mask2Former's "
        "multi-scale deformable attention through the transformers PyTorch path (grid_sample), timed forward + "
        "backward on the tensors of one training forward; its share is of the wall-clock step.\n\n"
        f"{table}\n\n"
        + (verdict if cuda else
           "CPU run: the ratios use process CPU time (all threads), which other load does not inflate; "
           "2-core ratios are not GPU ratios, and the memory columns count activations (saved for backward, "
           "or added by forward + backward), not the allocator's peak with weights and optimizer state. "
           "The GPU target (Mask2Former's training step <= 2.0x UperNet's) needs this script on CUDA.")
        + "\n"
    )
    print(table)
    print(verdict if cuda else f"(CPU run: the target is for a GPU; CPU-time ratio {ratio:.2f}x)")
    if args.report:
        command = ("python tools/benchmark_segmentation.py " + " ".join(sys.argv[1:])).strip()
        append_report(args.report, "ADE20K heads: RevColV2-B UperNet vs Mask2Former", command, args.device, body)
        print(f"appended to {args.report}")


if __name__ == "__main__":
    main()
