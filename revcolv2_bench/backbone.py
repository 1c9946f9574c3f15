"""Classification training step: RevColV2-B (reversible, plain) vs timm ViT-B/16 (with and
without ``set_grad_checkpointing()``), eager and compiled, in one invocation.

A step is forward + cross-entropy + backward + AdamW step, for every row: the same batch,
resolution, drop path (0.1), optimizer (AdamW, foreach), precision (bf16 autocast on CUDA
and in the CPU analysis; fp32 timing on CPU) and warm-up. Every (row, batch) pair runs in a
fresh process, so no row inherits another's allocator state, compiled kernels or memory
peak.

Columns: img/s and ms/step (wall), host CPU-s/step (a row whose host time is close to its
wall time is launch-bound: the GPU waits for Python, and img/s then measures overhead, not
the GPU), peak memory (CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps,
weights + grads + AdamW state included), and five device-independent columns measured in
bf16 autocast: activation peak per image (live-bytes tracker, (peak at batch 6 - peak at
batch 2) / 4), GFLOPs per image of forward + backward (``FlopCounterMode``: 2 FLOPs per
multiply-add), block forward evaluations per step, and the non-GEMM MB per image and ops
per step (bytes read + written by every op that is not a matrix product or attention, per
image by the same batch difference; ops launched, views excluded). ``--profile-dir DIR``
adds the profiled kernel time per step by kind (GEMM, attention, other) and writes a
Chrome trace per row to DIR.

Rows (``--rows``; ``--compile`` adds the ``-compiled`` ones):
  vit, vit-ckpt, plain, rev                       eager
  vit-compiled, vit-ckpt-compiled, plain-compiled torch.compile(model)
  rev-compiled                                    reversible, model.compile_levels()

    python tools/benchmark_backbone.py --variant revcolv2_tiny --batch-sizes 2    # quick CPU check
    python tools/benchmark_backbone.py --device cpu --report                       # CPU, writes the current CPU table
    python tools/benchmark_backbone.py --device cuda --batch-sizes 128,512 --compile
    python tools/benchmark_backbone.py --device cuda --batch-sizes 128 --profile-dir runs/profile  # where time goes
"""
import torch

from .analysis import ANALYSIS_COLUMNS
from .cli import worker_args
from .measure import run_step_workers
from .profiling import PROFILE_COLUMNS
from .report import markdown_table
from .step_benchmark import finish_step_benchmark, prepare_row, step_benchmark_start, step_jobs, step_worker

TOOL = "benchmark_backbone.py"

ROWS = {
    "vit": "ViT-B/16 (timm)",
    "vit-ckpt": "ViT-B/16 (timm) + set_grad_checkpointing()",
    "plain": "RevColV2 plain",
    "rev": "RevColV2 reversible",
    "vit-compiled": "ViT-B/16 (timm), compiled",
    "vit-ckpt-compiled": "ViT-B/16 (timm) + grad ckpt, compiled",
    "plain-compiled": "RevColV2 plain, compiled",
    "rev-compiled": "RevColV2 reversible, compiled levels",
}
MEMORY_SAVING = {"vit-ckpt", "rev", "vit-ckpt-compiled", "rev-compiled"}
DROP_PATH = 0.1
# the ViT of the same width as each preset (a quick check with revcolv2_tiny uses ViT-Ti)
VIT_OF = {"revcolv2_tiny": "vit_tiny_patch16_224", "revcolv2_base": "vit_base_patch16_224",
          "revcolv2_large": "vit_large_patch16_224"}


def build(key: str, variant: str, img_size: int, device: str) -> torch.nn.Module:
    import timm

    import revcolv2  # noqa: F401  (registers the presets with timm)

    base = key.replace("-compiled", "")
    if base.startswith("vit"):
        model = timm.create_model(VIT_OF.get(variant, "vit_base_patch16_224"), num_classes=1000, img_size=img_size,
                                  drop_path_rate=DROP_PATH)
        model.set_grad_checkpointing(base == "vit-ckpt")
    else:
        model = timm.create_model(variant, num_classes=1000, img_size=img_size, drop_path_rate=DROP_PATH,
                                  reversible=base == "rev")
    return prepare_row(model, key, device)


def worker(args) -> dict:
    torch.manual_seed(0)
    model = build(args.worker, args.variant, args.img_size, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def make_batch(batch: int, g: torch.Generator):
        return (torch.randn(batch, 3, args.img_size, args.img_size, generator=g),
                torch.randint(0, 1000, (batch,), generator=g))

    def loss_fn(model, x, y):
        return torch.nn.functional.cross_entropy(model(x), y)

    return step_worker(args, model, opt, make_batch, loss_fn)


def main():
    start = step_benchmark_start(__doc__, ROWS, ["vit", "vit-ckpt", "plain", "rev"], "128,512", worker)
    if start is None:
        return
    args, keys, batches = start
    cuda = args.device.startswith("cuda")
    # larger batches: only the memory-saving eager rows (compiling costs ~1 min a row), unless --all-batches
    jobs = step_jobs(args, keys, batches, lambda k: k in MEMORY_SAVING and not k.endswith("-compiled"))
    rows = run_step_workers(__spec__.name, jobs, worker_args(args), args.worker_timeout, "benchmark_backbone")
    finish_step_benchmark(TOOL, args, rows, summarize(rows, args.variant, cuda),
                          f"Backbone training step: {args.variant} vs ViT-B/16",
                          "Classification training step (forward + CE + backward + AdamW)", f"drop path {DROP_PATH}")


def summarize(rows, variant: str, cuda: bool) -> str:
    """Markdown table with speed and memory relative to ViT-B (+ checkpointing) at the same batch."""
    by = {(r["key"], r["batch"]): r for r in rows}
    speed = "img/s" if cuda else "host CPU-s/step"
    vit = VIT_OF.get(variant, "vit_base_patch16_224")
    for r in rows:
        r["model"] = ROWS[r["key"]].replace("RevColV2", variant).replace("ViT-B/16", vit)
        if "error" in r:
            continue
        comp = "-compiled" if r["key"].endswith("-compiled") else ""
        for ref_key, col in (("vit" + comp, "speed vs ViT-B"), ("vit-ckpt" + comp, "speed vs ViT-B+ckpt")):
            ref = by.get((ref_key, r["batch"]))
            if ref and "error" not in ref:
                ratio = r["img/s"] / ref["img/s"] if cuda else ref[speed] / r[speed]
                r[col] = f"{ratio:.2f}x"
        ref = by.get(("vit-ckpt" + comp, r["batch"]))
        mem = "peak GiB" if cuda else None
        if mem and ref and "error" not in ref:
            r["memory vs ViT-B+ckpt"] = f"{r[mem] / ref[mem]:.2f}x"
    cols = ["model", "batch", "img/s", "ms/step", "ms/step range", "host CPU-s/step", "speed vs ViT-B",
            "speed vs ViT-B+ckpt"]
    cols += ["peak GiB", "memory vs ViT-B+ckpt"] if cuda else ["peak RSS (MB)"]
    cols += ANALYSIS_COLUMNS + PROFILE_COLUMNS + ["params (M)", "error"]
    cols = [c for c in cols if any(c in r for r in rows) or c == "model"]
    return markdown_table(rows, cols)


if __name__ == "__main__":
    main()
