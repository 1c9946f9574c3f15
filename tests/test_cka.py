"""Linear CKA (``revcolv2.cka``) against its known properties (Kornblith et al. 2019): 1 for
identical inputs, invariant to orthogonal transforms and isotropic scaling (not to other
linear maps), a value computed by hand, and the batched accumulation equal to the one-shot
value."""
import math

import pytest
import torch

from revcolv2.cka import CKAStats, linear_cka


def _reps(n=200, p=12, q=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x[:, :q] @ torch.randn(q, q, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, q, generator=g,
                                                                                           dtype=torch.float64)
    return x, y


def test_identical_representations_give_one():
    x, _ = _reps()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x + 3.0, x) == pytest.approx(1.0, abs=1e-12)  # centred: a shift changes nothing


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = _reps()
    base = linear_cka(x, y)
    assert 0.05 < base < 0.95
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, -y) == pytest.approx(base, abs=1e-12)  # a reflection
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-12)
    # but not to a general linear map: CKA is no canonical correlation
    stretch = torch.diag(torch.linspace(0.1, 10, 12, dtype=torch.float64))
    assert abs(linear_cka(x @ stretch, y) - base) > 1e-3


def test_a_value_computed_by_hand():
    # centred x = (-1, 0, 1), y = (0, -1, 1): <x, y> = 1, ||x||^2 = ||y||^2 = 2, so
    # CKA = <x, y>^2 / (||x||^2 ||y||^2) = 1 / 4 (the squared correlation of one feature each)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [2.0]])
    assert linear_cka(x, y) == pytest.approx(0.25, abs=1e-12)
    # two features: x = [[1, 0], [0, 1], [-1, -1]] (already centred), y = x[:, :1]:
    # X^T X = [[2, 1], [1, 2]], ||.||_F = sqrt(10); Y^T Y = 2; Y^T X = [2, 1], ||.||^2 = 5
    x2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    assert linear_cka(x2, x2[:, :1]) == pytest.approx(5 / (math.sqrt(10) * 2), abs=1e-12)


def test_batched_accumulation_equals_the_one_shot_value():
    x, y = _reps(n=300)
    stats = CKAStats()
    for i in range(0, 300, 64):  # uneven last batch
        stats.update({"x": x[i:i + 64].float(), "y": y[i:i + 64].float()}, [("x", "y"), ("x", "x")])
    assert stats.n == 300
    assert stats.cka("x", "y") == pytest.approx(linear_cka(x, y), abs=1e-6)
    assert stats.cka("x", "x") == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(KeyError, match="give the pair"):
        stats.cka("y", "x")
    with pytest.raises(ValueError, match="same examples"):
        stats.update({"x": x[:3], "y": y[:4]}, [])


def test_a_constant_representation_gives_nan():
    x, _ = _reps()
    assert math.isnan(linear_cka(x, torch.ones(200, 3)))
    with pytest.raises(ValueError, match="same n examples"):
        linear_cka(x, x[:10])
