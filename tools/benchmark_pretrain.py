#!/usr/bin/env python
"""MIM pre-training step: RevColV2-B (reversible, plain) vs MAE ViT-B/16, in one run.

A step is masking (ratio 0.75) + forward + masked-patch MSE + backward + AdamW step, the
same batch, resolution and precision for every model (bf16 autocast on CUDA, fp32 on CPU).
The MAE baseline is written here from timm's ViT blocks: a 12-block 768-wide encoder on the
25% visible tokens (+ class token), an 8-block 512-wide decoder on all tokens, as in
MAE's ``mae_vit_base_patch16_dec512d8b``. Each model runs in its own subprocess, so that
peak-memory figures do not leak between models.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (weights, grads
and AdamW state included) and the same minus the memory held between steps ("step adds":
activations and temporaries). On CPU, "fwd+bwd adds" is the peak of live tensor bytes
allocated during one forward + backward with the gradient buffers already allocated (the
profiler's allocator events summed in time order: activations and temporaries, including
the reversible backward's one-column rebuild), next to the bytes autograd saves for
backward during one forward (saved-tensor hooks) and the process's peak RSS.

    python tools/benchmark_pretrain.py                  # CPU: batch 2, fp32, 1 + 3 steps
    python tools/benchmark_pretrain.py --batch 128      # CUDA: bf16 autocast
"""
import json
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

MODELS = ["RevColV2-B reversible", "RevColV2-B plain", "MAE ViT-B/16"]


class MAEViT(nn.Module):
    """MAE ViT-B/16 for the benchmark: patchify, random masking, encoder, decoder, loss."""

    def __init__(self, img_size=224, patch_size=16, dim=768, depth=12, heads=12,
                 dec_dim=512, dec_depth=8, dec_heads=16, mask_ratio=0.75):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        from revcolv2.model import sincos_pos_embed_2d

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
        from revcolv2.mim import RevColV2MIM, patchify, random_masking

        x = self.patch_embed(imgs) + self.pos  # (B, N, D)
        b, n, d = x.shape
        ids_keep, mask = random_masking(b, n, self.mask_ratio, imgs.device)
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, d))  # (B, N/4, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        cls, vis = x[:, :1], x[:, 1:]
        full = self.mask_token.expand(b, n, -1).to(vis.dtype)
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, vis.shape[-1]), vis) + self.dec_pos
        x = torch.cat([cls, full], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*3)
        target = patchify(imgs, self.patch_size)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        return RevColV2MIM.masked_mse(pred, (target - mean) / (var + 1e-6) ** 0.5, mask)


def build(label: str, img_size: int) -> nn.Module:
    from revcolv2.mim import create_mim_model

    if label == "MAE ViT-B/16":
        return MAEViT(img_size)
    return create_mim_model("revcolv2_base", img_size=img_size, reversible=label.endswith("reversible"))


def worker(args) -> dict:
    from revcolv2.bench import SavedActivations, cpu_peak_bytes, peak_rss_mb, timed

    device, cuda = args.device, args.device.startswith("cuda")
    torch.manual_seed(0)
    model = build(args.worker, args.img_size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)

    def loss_of(m):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = m(x)
        return out["loss"] if isinstance(out, dict) else out

    def step():
        loss_of(model).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocate the optimizer state before measuring
    with SavedActivations(model) as saved:
        loss = loss_of(model)
    loss.backward()
    opt.zero_grad(set_to_none=True)
    out = {"params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    if cuda:
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    sec, cpu_sec = timed(step, device, args.warmup, args.iters)
    out.update({"img/s": round(args.batch / sec, 2), "ms/step": round(sec * 1000, 1),
                "CPU-s/step": round(cpu_sec, 2),
                "saved activations (MB)": round(saved.total / 2 ** 20, 1)})
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out["peak GPU mem (GiB)"] = round(peak / 2 ** 30, 2)
        out["step adds (GiB)"] = round((peak - static) / 2 ** 30, 2)
    else:
        loss_of(model).backward()  # gradient buffers exist (and stay) from here on
        opt.zero_grad(set_to_none=False)
        out["fwd+bwd adds (MB)"] = round(cpu_peak_bytes(lambda: loss_of(model).backward()) / 2 ** 20, 1)
        out["peak RSS (MB)"] = round(peak_rss_mb(), 0)
    return out


def main():
    from revcolv2.bench import benchmark_parser, fill_device_defaults

    ap = benchmark_parser(__doc__, MODELS)
    ap.add_argument("--img-size", type=int, default=224)
    args = ap.parse_args()
    # batch 2 on CPU, 128 on CUDA
    cuda = fill_device_defaults(args, batch=(2, 128), warmup=(1, 5), iters=(3, 20))

    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    from revcolv2.bench import append_report, markdown_table, run_workers

    rows = run_workers(__file__, MODELS, ["--batch", args.batch, "--img-size", args.img_size,
                                          "--warmup", args.warmup, "--iters", args.iters,
                                          "--device", args.device], "benchmark_pretrain")
    mae = rows[-1]
    mem_col = "peak GPU mem (GiB)" if cuda else "fwd+bwd adds (MB)"
    for r in rows:
        # on a shared CPU, process CPU time (all threads) is the figure other load does not inflate
        speed = mae["ms/step"] / r["ms/step"] if cuda else mae["CPU-s/step"] / r["CPU-s/step"]
        r["speed vs MAE"] = f"{speed:.2f}x"
        r["memory vs MAE"] = f"{r[mem_col] / mae[mem_col]:.2f}x"
    cols = ["model", "params (M)", "img/s", "ms/step"] + ([] if cuda else ["CPU-s/step"])
    cols += ["speed vs MAE", "saved activations (MB)"]
    cols += ["peak GPU mem (GiB)", "step adds (GiB)"] if cuda else ["fwd+bwd adds (MB)", "peak RSS (MB)"]
    cols += ["memory vs MAE"]
    table = markdown_table(rows, cols)
    precision = "bf16 autocast" if cuda else "fp32"
    plain, rev = rows[1], rows[0]
    verdict = (f"Targets (GPU): plain >= 0.9x MAE img/s -> {plain['speed vs MAE']}; reversible <= 0.5x MAE "
               f"peak memory -> {rev['memory vs MAE']}.")
    body = (f"MIM pre-training step (mask 0.75, forward + masked MSE + backward + AdamW), batch {args.batch}, "
            f"{args.img_size}x{args.img_size}, {precision}, no drop path, {args.warmup} warm-up + "
            f"{args.iters} timed steps. \"speed vs MAE\" compares "
            f"{'wall time' if cuda else 'process CPU seconds'} per step, \"memory vs MAE\" {mem_col}."
            f"\n\n{table}\n\n"
            + (verdict if cuda else
               "CPU run: 2-core speed ratios are not GPU ratios, and \"memory vs MAE\" compares what forward + "
               "backward add (activations and temporaries, not weights, gradients or optimizer state). The "
               "reversible figure includes the parameter gradients that the reversible engine holds for a whole "
               "run of columns until it returns them (about the BU columns' size, 240 MB in fp32), which "
               "dominates at a small batch. The GPU targets (plain >= 0.9x MAE img/s, reversible <= 0.5x MAE "
               "peak memory at the same batch) need this script on CUDA.")
            + "\n")
    print(table)
    if not args.no_report:
        command = "python tools/benchmark_pretrain.py " + " ".join(sys.argv[1:])
        append_report(args.report, "MIM pre-training step: RevColV2-B vs MAE ViT-B/16", command.strip(),
                      args.device, body)
        print(f"appended to {args.report}")


if __name__ == "__main__":
    main()
