"""revcolv2.visualization.reconstruction_grid: the MAE-style picture of a MIM model's output."""
import torch

from revcolv2.mim import RevColV2MIM
from revcolv2.visualization import reconstruction_grid


def test_grid_layout_pixels_and_side_effects():
    torch.manual_seed(0)
    model = RevColV2MIM(embed_dim=32, num_heads=2, patch_size=8).train()
    images = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    grid = reconstruction_grid(model, images, seed=3)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # RNG and mode untouched
    assert grid.shape == (3, 2 + 2 * 34, 2 + 4 * 34)  # 2 rows x 4 panels of 32 + 2 padding
    assert grid.min() >= 0 and grid.max() <= 1

    def panel(row, col):
        return grid[:, 2 + 34 * row: 34 * (row + 1), 2 + 34 * col: 34 * (col + 1)]

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    original = (images[0] * std + mean).clamp(0, 1)
    assert torch.allclose(panel(0, 0), original, atol=1e-6)
    # the mask of seed 3: masked patches are grey in panel 1 and reconstructed in panel 3
    masked_px = (panel(0, 1) == 0.5).all(0)
    assert 0.5 < masked_px.float().mean() < 0.95  # mask ratio 0.75 of 16 patches
    assert torch.allclose(panel(0, 3)[:, ~masked_px], original[:, ~masked_px], atol=1e-6)
    assert torch.allclose(panel(0, 3)[:, masked_px], panel(0, 2)[:, masked_px], atol=1e-6)
    assert torch.equal(grid, reconstruction_grid(model, images, seed=3))  # same seed, same picture
