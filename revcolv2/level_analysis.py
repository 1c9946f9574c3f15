"""What each level of each column holds: linear CKA (:mod:`revcolv2.cka`) of every
column's every level against three references, over the tokens of a set of images.

The paper's claim ("disentangled representations"): the top-down columns keep low-level
information in their low levels and the bottom-up columns grow semantic. The references:

- ``pixels``: each token's own patch of input pixels (p x p x 3, as the model sees them);
- ``patch_embed``: the patch embedding of those pixels (before the position embedding);
- ``last_top_level``: the top level of the last column, what a classifier pools.

Examples are tokens (every patch of every image), so a level that keeps the detail of its
patch scores high against the pixels, and one that carries the image's semantics scores
high against the last top level. Levels a model does not build (a classifier computes only
the top level of its last column) are NaN. ``docs/ARCHITECTURE.md`` says how to read the
picture.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor

from .cka import CKAStats
from .mim import patchify
from .model import RevColV2

__all__ = ["REFERENCES", "column_names", "level_tokens", "analyze_levels", "write_results", "draw_heatmap"]

REFERENCES = {
    "pixels": "the input pixels of each patch",
    "patch_embed": "the patch embedding",
    "last_top_level": "the top level of the last column",
}


def column_names(model: RevColV2) -> List[str]:
    """``BU 1``, ``BU 2``, ..., ``TD 1``, ...: the columns in execution order."""
    return ([f"BU {j + 1}" for j in range(model.num_bu_columns)]
            + [f"TD {j + 1}" for j in range(model.num_td_columns)])


def _level(j: int, l: int) -> str:
    return f"column{j}.level{l}"


@torch.no_grad()
def level_tokens(model: RevColV2, images: Tensor) -> Dict[str, Tensor]:
    """Every token of ``images`` (B, 3, H, W) as each representation: ``pixels`` (B*N,
    p*p*3), ``patch_embed`` and ``last_top_level`` (B*N, D), and ``column<j>.level<l>`` for
    every level the model builds."""
    tokens, _ = model.patch_embed(images)
    plan = model.plan
    states, _ = model.run_columns(images, list(plan.built), list(range(plan.num_columns)))
    out = {"pixels": patchify(images, model.patch_size).flatten(0, 1), "patch_embed": tokens.flatten(0, 1)}
    for j, state in enumerate(states):
        for l, t in enumerate(state):
            if t is not None:
                out[_level(j, l)] = t.flatten(0, 1)
    out["last_top_level"] = out[_level(plan.num_columns - 1, model.num_levels - 1)]
    return out


def analyze_levels(model: RevColV2, batches: Iterable[Tensor], max_images: Optional[int] = None) -> dict:
    """Linear CKA of every built level against every reference, over the tokens of the
    image batches (at most ``max_images`` images). Returns ``{"images", "tokens",
    "columns", "levels", "cka": {reference: [[value per level] per column]}}`` with NaN
    for the levels the model does not build."""
    model.eval()
    device = next(model.parameters()).device
    stats, images, levels = CKAStats(), 0, None
    for batch in batches:
        if max_images is not None:
            batch = batch[: max_images - images]
        if not len(batch):
            break
        feats = level_tokens(model, batch.to(device))
        levels = [k for k in feats if k.startswith("column")]
        stats.update({k: v.float() for k, v in feats.items()}, [(k, r) for k in levels for r in REFERENCES])
        images += len(batch)
        if max_images is not None and images >= max_images:
            break
    if not images:
        raise ValueError("no image to analyse")
    nc, nl = model.num_bu_columns + model.num_td_columns, model.num_levels
    cka = {r: [[stats.cka(_level(j, l), r) if _level(j, l) in levels else math.nan for l in range(nl)]
                for j in range(nc)] for r in REFERENCES}
    return {"images": images, "tokens": stats.n, "columns": column_names(model), "levels": list(range(nl)),
            "cka": cka}


def draw_heatmap(values: List[List[float]], columns: List[str], title: str, path: str) -> None:
    """Columns (rows) x levels heatmap of CKA values in [0, 1], each cell labelled; NaN
    cells (levels not built) grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * data.shape[1] + 2.2, 0.6 * data.shape[0] + 1.6))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#d0d0d0")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(data.shape[1]), [f"level {l}" for l in range(data.shape[1])])
    ax.set_yticks(range(data.shape[0]), columns)
    for (r, c), v in np.ndenumerate(data):
        label = "not built" if np.isnan(v) else f"{v:.2f}"
        ax.text(c, r, label, ha="center", va="center", fontsize=8,
                color="black" if np.isnan(v) or v > 0.6 else "white")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict, output: str, meta: Optional[dict] = None) -> List[str]:
    """``output/cka.json`` (NaN written as null) and one heatmap per reference
    (``output/cka_<reference>.png``); returns the written paths."""
    os.makedirs(output, exist_ok=True)
    written = []
    for ref, what in REFERENCES.items():
        path = os.path.join(output, f"cka_{ref}.png")
        draw_heatmap(results["cka"][ref], results["columns"], f"Linear CKA with {what}\n"
                     f"({results['images']} images, {results['tokens']} tokens)", path)
        written.append(path)
    data = {**(meta or {}), **results,
            "cka": {r: [[None if math.isnan(v) else v for v in row] for row in rows]
                    for r, rows in results["cka"].items()}}
    path = os.path.join(output, "cka.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
    return [path] + written
