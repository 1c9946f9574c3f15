#!/usr/bin/env python
"""Training-step throughput and memory: RevColV2-B (reversible, plain) vs timm ViT-B/16.

All four run in one invocation with the same batch, resolution and precision:
  revcolv2_base reversible | revcolv2_base plain | vit_base_patch16_224 | same + grad checkpointing
A step is forward + cross-entropy + backward + AdamW step. Each model runs in its own
subprocess so that peak-memory figures do not leak between models.

Memory: on CUDA, torch.cuda.max_memory_allocated over the timed steps; on CPU the
activation bytes that autograd saves for backward (saved-tensor hooks, weights excluded),
the peak of live tensor bytes added by one forward + backward (profiler memory events),
and the process's peak RSS (which includes weights and optimizer state). On CPU, speed
ratios use process CPU time, which other load on the machine does not inflate.

    python tools/benchmark_backbone.py                     # CPU: batch 2, fp32
    python tools/benchmark_backbone.py --batch 64          # CUDA: bf16 autocast when a GPU is present
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MODELS = {
    "RevColV2-B reversible": ("revcolv2_base", dict(reversible=True)),
    "RevColV2-B plain": ("revcolv2_base", dict(reversible=False)),
    "ViT-B/16 (timm)": ("vit_base_patch16_224", {}),
    "ViT-B/16 (timm) + grad ckpt": ("vit_base_patch16_224", {"grad_ckpt": True}),
}


def worker(args) -> dict:
    import timm

    import revcolv2  # noqa: F401  (registers the presets with timm)
    from revcolv2.bench import SavedActivations, cpu_peak_bytes, peak_rss_mb, timed

    name, kwargs = MODELS[args.worker]
    kwargs = dict(kwargs)
    grad_ckpt = kwargs.pop("grad_ckpt", False)
    device = args.device
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000, drop_path_rate=0.1, **kwargs).to(device).train()
    if grad_ckpt:
        model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    use_amp = device.startswith("cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocate optimizer state before measuring memory
    with SavedActivations(model) as saved:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.zero_grad(set_to_none=True)
    if use_amp:
        torch.cuda.reset_peak_memory_stats()
    sec, cpu_sec = timed(step, device, args.warmup, args.iters)
    out = {"img/s": round(args.batch / sec, 2), "ms/step": round(sec * 1000, 1),
           "CPU-s/step": round(cpu_sec, 2),
           "saved activations (MB)": round(saved.total / 2**20, 1)}
    if use_amp:
        out["peak GPU mem (GiB)"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        def fwd_bwd():
            torch.nn.functional.cross_entropy(model(x), y).backward()

        fwd_bwd()  # gradient buffers exist (and stay) from here on
        out["fwd+bwd adds (MB)"] = round(cpu_peak_bytes(fwd_bwd) / 2**20, 1)
        opt.zero_grad(set_to_none=True)
        out["peak RSS (MB)"] = round(peak_rss_mb(), 0)
    return out


def main():
    from revcolv2.bench import benchmark_parser, fill_device_defaults

    ap = benchmark_parser(__doc__, MODELS)
    ap.add_argument("--img-size", type=int, default=224)
    args = ap.parse_args()
    # batch 2 on CPU, 64 on CUDA
    cuda = fill_device_defaults(args, batch=(2, 64), warmup=(1, 5), iters=(3, 20))

    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    from revcolv2.bench import append_report, markdown_table, run_workers

    rows = run_workers(__file__, list(MODELS), ["--batch", args.batch, "--img-size", args.img_size,
                                                "--warmup", args.warmup, "--iters", args.iters,
                                                "--device", args.device], "benchmark_backbone")
    # on a CPU, speed ratios use process CPU time, which other load on the machine does not inflate
    vit = rows[2]
    for r in rows:
        ratio = r["img/s"] / vit["img/s"] if cuda else vit["CPU-s/step"] / r["CPU-s/step"]
        r["speed vs ViT-B"] = f"{ratio:.2f}x"
    mem_cols = ["peak GPU mem (GiB)"] if cuda else ["fwd+bwd adds (MB)", "peak RSS (MB)"]
    cols = ["model", "img/s", "ms/step", "CPU-s/step", "speed vs ViT-B", "saved activations (MB)", *mem_cols]
    table = markdown_table(rows, cols)
    precision = "bf16 autocast" if cuda else "fp32"
    body = (f"Training step (forward + CE + backward + AdamW), batch {args.batch}, "
            f"{args.img_size}x{args.img_size}, {precision}, drop path 0.1, "
            f"{args.warmup} warm-up + {args.iters} timed steps.\n\n{table}\n")
    if not cuda:
        body += ("\nCPU run: throughput ratios on 2 cores are not GPU ratios; the GPU targets "
                 "(plain >= 0.95x ViT-B, reversible >= ViT-B+ckpt speed at <= its peak memory) "
                 "need this script on a CUDA machine.\n")
    print(table)
    if not args.no_report:
        command = "python tools/benchmark_backbone.py " + " ".join(sys.argv[1:])
        append_report(args.report, "Backbone training step: RevColV2-B vs ViT-B/16", command.strip(), args.device, body)
        print(f"appended to {args.report}")


if __name__ == "__main__":
    main()
