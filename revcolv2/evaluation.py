"""Top-1 / top-5 evaluation of a classifier, sharded over the processes."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import shard_indices
from .distributed import DistInfo, all_reduce_sum
from .signals import ignore_stop_signals


@torch.no_grad()
def evaluate(forward, dataset: Dataset, info: DistInfo, batch_size: int, num_workers: int = 4,
             autocast=nullcontext) -> Dict[str, float]:
    """Top-1 / top-5 (%) and cross-entropy of ``forward(images) -> logits`` over ``dataset``.

    Each process evaluates a disjoint shard and the counts are summed, so every image
    counts exactly once whatever the number of processes.
    """
    from torch.utils.data import Subset

    subset = Subset(dataset, shard_indices(len(dataset), info.rank, info.world_size))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=info.device.type == "cuda", generator=torch.Generator(),
                        worker_init_fn=ignore_stop_signals)
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # n, top1, top5, loss
    for images, target in loader:
        images = images.to(info.device, non_blocking=True)
        target = target.to(info.device, non_blocking=True)
        with autocast():
            logits = forward(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        correct = topk.eq(target[:, None])
        sums += torch.stack([
            torch.tensor(float(len(target)), device=info.device, dtype=torch.float64),
            correct[:, :1].sum().double(),
            correct.sum().double(),
            nn.functional.cross_entropy(logits, target, reduction="sum").double(),
        ])
    sums = all_reduce_sum(sums, info)
    n = max(sums[0].item(), 1.0)
    return {"top1": 100.0 * sums[1].item() / n, "top5": 100.0 * sums[2].item() / n, "loss": sums[3].item() / n}
