"""MIM pre-training step: RevColV2-B (reversible, plain) vs MAE ViT-B/16, eager and compiled.

A step is masking (ratio 0.75) + forward + masked-patch MSE + backward + AdamW step, with
the same batch, resolution, optimizer (AdamW betas (0.9, 0.95), foreach), precision (bf16
autocast on CUDA and in the CPU analysis columns; fp32 timing on CPU) and warm-up for every
row. The MAE baseline is written here from timm's ViT blocks: a 12-block 768-wide encoder
on the 25% visible tokens (+ class token), an 8-block 512-wide decoder on all tokens, as in
MAE's ``mae_vit_base_patch16_dec512d8b``. Every (row, batch) pair runs in a fresh process.

Columns as in ``tools/benchmark_backbone.py``: img/s, ms/step, host CPU-s/step, peak memory
(CUDA: ``torch.cuda.max_memory_allocated``, weights + grads + AdamW state included), and the
device-independent activation peak per image, GFLOPs per image (forward + backward,
FlopCounterMode), block forward evaluations per step, non-GEMM MB per image and ops per
step; ``--profile-dir DIR`` adds the profiled kernel time per step by kind.

Rows (``--rows``; ``--compile`` adds the ``-compiled`` ones):
  mae, plain, rev                                  eager
  mae-compiled, plain-compiled                     torch.compile(model)
  rev-compiled                                     reversible, model.compile_levels()

    python tools/benchmark_pretrain.py --variant revcolv2_tiny --batch-sizes 2     # quick CPU check
    python tools/benchmark_pretrain.py --device cpu --report                        # CPU, writes the current CPU table
    python tools/benchmark_pretrain.py --device cuda --batch-sizes 256 --compile
"""
from functools import partial

import torch
from torch import Tensor, nn

from .analysis import ANALYSIS_COLUMNS
from .cli import worker_args
from .measure import run_step_workers
from .profiling import PROFILE_COLUMNS
from .report import markdown_table
from .step_benchmark import finish_step_benchmark, prepare_row, step_benchmark_start, step_jobs, step_worker

TOOL = "benchmark_pretrain.py"

ROWS = {
    "mae": "MAE ViT-B/16",
    "plain": "RevColV2 plain",
    "rev": "RevColV2 reversible",
    "mae-compiled": "MAE ViT-B/16, compiled",
    "plain-compiled": "RevColV2 plain, compiled",
    "rev-compiled": "RevColV2 reversible, compiled levels",
}
# MAE of the same width as each preset (the tiny one for quick checks only)
MAE_OF = {"revcolv2_tiny": dict(dim=192, heads=3, dec_dim=128, dec_depth=2, dec_heads=4)}


class MAEViT(nn.Module):
    """MAE ViT-B/16 for the benchmark: patchify, random masking, encoder, decoder, loss."""

    def __init__(self, img_size=224, patch_size=16, dim=768, depth=12, heads=12,
                 dec_dim=512, dec_depth=8, dec_heads=16, mask_ratio=0.75):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        from revcolv2.layers import sincos_pos_embed_2d

        self.patch_size, self.mask_ratio = patch_size, mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, dim)
        g = img_size // patch_size
        self.register_buffer("pos", sincos_pos_embed_2d(g, g, dim), persistent=False)
        self.register_buffer("dec_pos", sincos_pos_embed_2d(g, g, dec_dim), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth))
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch_size ** 2 * 3)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, imgs: Tensor) -> Tensor:
        from revcolv2.mim import RevColV2MIM, normalize_patches, patchify, random_masking

        x = self.patch_embed(imgs) + self.pos  # (B, N, D)
        b, n, d = x.shape
        visible_ids, mask = random_masking(b, n, self.mask_ratio, imgs.device)
        x = x.gather(1, visible_ids[..., None].expand(-1, -1, d))  # (B, N/4, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        cls, vis = x[:, :1], x[:, 1:]
        full = self.mask_token.expand(b, n, -1).to(vis.dtype)
        full = full.scatter(1, visible_ids[..., None].expand(-1, -1, vis.shape[-1]), vis) + self.dec_pos
        x = torch.cat([cls, full], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*3)
        return RevColV2MIM.masked_mse(pred, normalize_patches(patchify(imgs, self.patch_size)), mask)


def build(key: str, variant: str, img_size: int, device: str) -> nn.Module:
    from revcolv2.mim import create_mim_model

    base = key.replace("-compiled", "")
    if base == "mae":
        model = MAEViT(img_size, **MAE_OF.get(variant, {}))
    else:
        model = create_mim_model(variant, img_size=img_size, reversible=base == "rev")
    return prepare_row(model, key, device)


def worker(args) -> dict:
    torch.manual_seed(0)
    model = build(args.worker, args.variant, args.img_size, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def make_batch(batch: int, g: torch.Generator):
        return (torch.randn(batch, 3, args.img_size, args.img_size, generator=g),)

    def loss_fn(model, x):
        out = model(x)
        return out["loss"] if isinstance(out, dict) else out

    return step_worker(args, model, opt, make_batch, loss_fn)


def main():
    start = step_benchmark_start(__doc__, ROWS, ["mae", "plain", "rev"], "256", worker)
    if start is None:
        return
    args, keys, batches = start
    cuda = args.device.startswith("cuda")
    jobs = step_jobs(args, keys, batches, lambda k: k == "rev")  # larger batches: the reversible row
    rows = run_step_workers(__spec__.name, jobs, worker_args(args), args.worker_timeout, "benchmark_pretrain")
    finish_step_benchmark(TOOL, args, rows, summarize(rows, args.variant, cuda),
                          f"MIM pre-training step: {args.variant} vs MAE ViT-B/16",
                          "MIM pre-training step (mask 0.75, forward + masked MSE + backward + AdamW)", "no drop path",
                          ' On CPU "speed vs MAE" compares host CPU seconds per step.')


def summarize(rows, variant: str, cuda: bool) -> str:
    """Markdown table with speed (and on CUDA memory) relative to MAE at the same batch."""
    by = {(r["key"], r["batch"]): r for r in rows}
    for r in rows:
        r["model"] = ROWS[r["key"]].replace("RevColV2", variant)
        if variant in MAE_OF:
            r["model"] = r["model"].replace("MAE ViT-B/16", f"MAE ViT ({variant} width)")
        mae = by.get(("mae-compiled" if r["key"].endswith("-compiled") else "mae", r["batch"]))
        if "error" in r or not mae or "error" in mae:
            continue
        r["speed vs MAE"] = (f"{r['img/s'] / mae['img/s']:.2f}x" if cuda
                             else f"{mae['host CPU-s/step'] / r['host CPU-s/step']:.2f}x")
        if cuda:
            r["memory vs MAE"] = f"{r['peak GiB'] / mae['peak GiB']:.2f}x"
    cols = ["model", "batch", "img/s", "ms/step", "ms/step range", "host CPU-s/step", "speed vs MAE"]
    cols += ["peak GiB", "memory vs MAE"] if cuda else ["peak RSS (MB)"]
    cols += ANALYSIS_COLUMNS + PROFILE_COLUMNS + ["params (M)", "error"]
    cols = [c for c in cols if c == "model" or any(c in r for r in rows)]
    return markdown_table(rows, cols)


if __name__ == "__main__":
    main()
