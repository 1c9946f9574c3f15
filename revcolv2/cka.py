"""Linear centred kernel alignment (CKA), Kornblith, Norouzi, Lee and Hinton, "Similarity of
Neural Network Representations Revisited", ICML 2019, eq. (5) with a linear kernel.

For two representations of the same n examples, X (n x p) and Y (n x q), each centred over
the examples (column means subtracted):

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It is 1 for identical representations and lies in [0, 1]; it does not change when either
representation is rotated or reflected (an orthogonal transform of its features) or scaled
by one number, but it does change under other linear maps. With one feature each it is the
squared Pearson correlation.

:func:`linear_cka` computes it from all examples at once. :class:`CKAStats` accumulates
the same quantities batch by batch (sums, X^T X, X^T Y), so a value over many tokens never
holds them all: the centred products are ``X^T Y - n mean_x mean_y^T``. Everything is
accumulated in float64.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
from torch import Tensor

__all__ = ["linear_cka", "CKAStats"]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same examples, (n, p) and (n, q)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, p) and (n, q) of the same n examples, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / denom) if denom > 0 else float("nan")


class CKAStats:
    """Linear CKA of named representations over examples that arrive in batches.

    ``update({name: (n_batch, d)}, pairs)`` adds a batch of the same examples for every
    name; ``cka(a, b)`` is then :func:`linear_cka` of the concatenated batches of ``a`` and
    ``b`` (for every pair given to ``update``). A representation with no variance gives NaN.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sums: Dict[str, Tensor] = {}
        self.grams: Dict[str, Tensor] = {}
        self.cross: Dict[Tuple[str, str], Tensor] = {}

    def update(self, batch: Dict[str, Tensor], pairs: Iterable[Tuple[str, str]]) -> None:
        sizes = {t.shape[0] for t in batch.values()}
        if len(sizes) != 1:
            raise ValueError(f"every representation of a batch needs the same examples, got sizes {sorted(sizes)}")
        feats = {k: v.detach().double() for k, v in batch.items()}
        for name, f in feats.items():
            self.sums[name] = self.sums.get(name, 0) + f.sum(0)
            self.grams[name] = self.grams.get(name, 0) + f.T @ f
        for a, b in pairs:
            self.cross[(a, b)] = self.cross.get((a, b), 0) + feats[a].T @ feats[b]
        self.n += sizes.pop()

    def _centred(self, a: str, b: str, product: Tensor) -> Tensor:
        return product - torch.outer(self.sums[a], self.sums[b]) / self.n

    def cka(self, a: str, b: str) -> float:
        if (a, b) not in self.cross:
            raise KeyError(f"no CKA accumulated for ({a!r}, {b!r}): give the pair to update()")
        cross = self._centred(a, b, self.cross[(a, b)])
        denom = (torch.linalg.matrix_norm(self._centred(a, a, self.grams[a]))
                 * torch.linalg.matrix_norm(self._centred(b, b, self.grams[b])))
        return float(cross.pow(2).sum() / denom) if denom > 0 else float("nan")
