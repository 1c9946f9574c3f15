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
    python tools/benchmark_segmentation.py --device cpu --report  # ... and writes it to docs/BENCHMARKS.md

Target on a GPU: Mask2Former's training step <= 2.0x UperNet's.
"""
import os
import time

import torch

from revcolv2.amp import autocast

from .cli import benchmark_parser, fill_device_defaults
from .detectron2_runs import detectron2_train_infer
from .measure import print_result, run_workers
from .report import CPU_RATIO_NOTE, add_ratio_columns, markdown_table, print_and_report, write_rows_json

TOOL = "benchmark_segmentation.py"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = ["RevColV2-B UperNet", "RevColV2-B Mask2Former"]
CONFIGS = {
    "RevColV2-B UperNet": os.path.join(_ROOT, "projects", "RevColV2", "configs", "ADE20K",
                                       "upernet_revcolv2_b_160k.py"),
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
    torch.manual_seed(0)
    model = build(args.worker).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    train_batch = synthetic_batch(args.batch, args.size, args.device, with_targets=True)
    test_batch = synthetic_batch(args.batch, args.size, args.device, with_targets=False)
    recorder = _MSDACalls() if "Mask2Former" in args.worker else None

    def msda_columns(step_seconds: float) -> dict:
        """Deformable attention's share of a training step, on the tensors of one forward."""
        if recorder is None:
            return {}
        with autocast(args.device, "bf16"):
            ms = msda_seconds(recorder.calls, args.device, max(1, args.iters))
        return {"MSDA calls/step": len(recorder.calls), "MSDA fwd+bwd ms/step": round(ms * 1000, 1),
                "MSDA share of step": f"{100 * ms / step_seconds:.1f}%"}

    out = {"params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "head params (M)": round(sum(p.numel() for p in model.sem_seg_head.parameters()) / 1e6, 1)}
    out.update(detectron2_train_infer(model, opt, train_batch, test_batch, args.device, args.warmup, args.iters,
                                      record_forward=recorder, after_training=msda_columns, infer_cpu_digits=3))
    return out


def main():
    ap = benchmark_parser(__doc__, MODELS)
    ap.add_argument("--size", type=int, default=512, help="square input side (the ADE20K crop)")
    args = ap.parse_args()
    cuda = fill_device_defaults(args, batch=(2, 8), warmup=(1, 3), iters=(2, 10))

    if args.worker:
        print_result(worker(args))
        return

    rows = run_workers(__spec__.name, MODELS, ["--batch", args.batch, "--size", args.size, "--warmup", args.warmup,
                                          "--iters", args.iters, "--device", args.device], "benchmark_segmentation")
    upernet, m2f = rows
    step, _, mem = add_ratio_columns(rows, upernet, "UperNet", cuda)
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
           CPU_RATIO_NOTE + "The GPU target (Mask2Former's training step <= 2.0x UperNet's) needs this script "
           "on CUDA.")
        + "\n"
    )
    print_and_report(TOOL, table,
                     verdict if cuda else f"(CPU run: the target is for a GPU; CPU-time ratio {ratio:.2f}x)",
                     args.report, "ADE20K heads: RevColV2-B UperNet vs Mask2Former", args.device, body)
    write_rows_json(args.json, rows)


if __name__ == "__main__":
    main()
