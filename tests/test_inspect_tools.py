"""Looking inside a checkpoint: ``tools/reconstruct.py`` (pre-training's panels for any image)
and ``tools/analyze_levels.py`` (linear CKA of every column's every level), on MIM,
fine-tuned and detectron2 checkpoints and more than one preset, with images written here."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from revcolv2.cli import analyze_levels, reconstruct
from revcolv2.mim import create_mim_model
from revcolv2.visualization import reconstruction_grid

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, num_heads=2, patch_size=8)
SIZE = 32
N = (SIZE // 8) ** 2  # tokens per image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six 40x48 RGB images in two folders, one of them a nested one."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = root / ("a" if i < 3 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return root


def _save(path: Path, model, variant="revcolv2_tiny", kwargs=TINY, ema=None, input_size=SIZE, **extra) -> Path:
    ckpt = {"model": model.state_dict(),
            "config": {"model": {"name": variant, "kwargs": dict(kwargs), **extra}, "data": {"input_size": input_size}}}
    if ema is not None:
        ckpt["model_ema"] = ema.state_dict()
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def mim_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_mim_model("revcolv2_tiny", img_size=SIZE, norm_pix_loss=False, **TINY)
    torch.manual_seed(1)
    ema = create_mim_model("revcolv2_tiny", img_size=SIZE, norm_pix_loss=False, **TINY)
    return _save(tmp_path_factory.mktemp("mim") / "mim.pth", model, ema=ema, mask_ratio=0.75, norm_pix_loss=False)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------- reconstruct
def test_the_tools_are_thin():
    tools = (("reconstruct", "revcolv2.cli.reconstruct"), ("analyze_levels", "revcolv2.cli.analyze_levels"))
    for tool, module in tools:
        tree = ast.parse((REPO / "tools" / f"{tool}.py").read_text())
        assert ast.get_docstring(tree)
        assert [n.module for n in tree.body if isinstance(n, ast.ImportFrom)] == [module]
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    for parser, flags in ((reconstruct.get_parser(), ("--checkpoint", "--output", "--mask-ratio", "--seed",
                                                      "--input-size", "--no-ema")),
                          (analyze_levels.get_parser(), ("--checkpoint", "--data", "--output", "--input-size",
                                                         "--max-images", "--model", "--no-ema"))):
        text = parser.format_help()
        assert all(f in text for f in flags)


def test_reconstruct_writes_the_grid_panels_for_every_image(mim_ckpt, images, tmp_path):
    written = reconstruct.main(["--checkpoint", str(mim_ckpt), str(images), "--output", str(tmp_path / "out")])
    names = sorted(str(Path(p).relative_to(tmp_path / "out")) for p in written)
    assert names == ["a/im0.png", "a/im1.png", "a/im2.png", "b/c/im3.png", "b/c/im4.png", "b/c/im5.png"]
    panel = _png(tmp_path / "out" / "a" / "im0.png")
    assert panel.shape == (SIZE + 4, 4 * (SIZE + 2) + 2, 3)  # one row: four panels, make_grid's padding
    # the same pixels as pre-training's grid code gives for that image, EMA weights, seed 0
    from revcolv2.checkpoint_models import mim_model_from_checkpoint
    from revcolv2.cli.pretrain import eval_transform

    model, _ = mim_model_from_checkpoint(str(mim_ckpt), verbose=False)
    x = eval_transform(SIZE)(Image.open(images / "a" / "im0.png").convert("RGB"))
    grid = reconstruction_grid(model, x[None], seed=0)
    want = (grid * 255 + 0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    assert np.array_equal(panel, want)


def _masked_fraction(panel: np.ndarray, size: int) -> float:
    """Share of grey (masked) pixels in the second panel."""
    masked = panel[2:2 + size, 4 + size:4 + 2 * size]
    return float(np.all(masked == 128, axis=-1).mean())


@pytest.mark.slow  # runs the tool several times (matplotlib, seconds)
def test_mask_ratio_seed_input_size_and_ema_change_the_panels(mim_ckpt, images, tmp_path):
    def run(name, *flags):
        return _png(reconstruct.main(["--checkpoint", str(mim_ckpt), str(images / "a" / "im0.png"),
                                      "--output", str(tmp_path / name), *flags])[0])

    default, low = run("d"), run("low", "--mask-ratio", "0.25")
    assert _masked_fraction(default, SIZE) == pytest.approx(0.75)
    assert _masked_fraction(low, SIZE) == pytest.approx(0.25)
    assert np.array_equal(run("seed0", "--seed", "0"), default)
    assert not np.array_equal(run("seed1", "--seed", "1"), default)  # another mask
    assert run("big", "--input-size", "48").shape == (48 + 4, 4 * 50 + 2, 3)
    raw = run("raw", "--no-ema")
    assert np.array_equal(raw[:, :SIZE + 4], default[:, :SIZE + 4])  # same original
    assert not np.array_equal(raw, default)  # other weights, other reconstruction
    with pytest.raises(SystemExit, match="mask-ratio"):
        run("bad", "--mask-ratio", "1.0")


def test_reconstruct_refuses_a_checkpoint_without_a_reconstruction_head(images, tmp_path):
    classifier = timm.create_model("revcolv2_tiny", num_classes=4, img_size=SIZE, **TINY)
    ckpt = _save(tmp_path / "ft.pth", classifier)
    with pytest.raises(SystemExit, match=r"ft\.pth is not a MIM pre-training checkpoint"):
        reconstruct.main(["--checkpoint", str(ckpt), str(images), "--output", str(tmp_path / "out")])


# ------------------------------------------------------------------------- analyze_levels
def _analyze(ckpt, images, out, *flags):
    results = analyze_levels.main(["--checkpoint", str(ckpt), "--data", str(images), "--output", str(out), *flags])
    saved = json.loads((out / "cka.json").read_text())
    for ref in ("pixels", "patch_embed", "last_top_level"):
        assert (out / f"cka_{ref}.png").is_file() and _png(out / f"cka_{ref}.png").shape[0] > 100
    return results, saved


@pytest.mark.slow  # runs the tool several times (matplotlib, seconds)
def test_analyze_levels_of_a_mim_checkpoint(mim_ckpt, images, tmp_path):
    results, saved = _analyze(mim_ckpt, images, tmp_path / "cka")
    assert saved["columns"] == ["BU 1", "BU 2", "TD 1"] and saved["levels"] == [0, 1, 2, 3]
    assert saved["images"] == 6 and saved["tokens"] == 6 * N and saved["input_size"] == SIZE
    for ref in ("pixels", "patch_embed", "last_top_level"):
        values = np.array(saved["cka"][ref], dtype=float)
        assert values.shape == (3, 4) and np.all((values > 0) & (values <= 1 + 1e-9))
    assert saved["cka"]["last_top_level"][2][3] == pytest.approx(1.0)  # the reference itself
    assert saved["cka"]["pixels"] != saved["cka"]["patch_embed"]
    # --max-images and --input-size change what is measured
    _, few = _analyze(mim_ckpt, images, tmp_path / "few", "--max-images", "2", "--input-size", "48")
    assert few["images"] == 2 and few["tokens"] == 2 * (48 // 8) ** 2
    _, raw = _analyze(mim_ckpt, images, tmp_path / "raw", "--no-ema")
    assert raw["cka"]["pixels"] != saved["cka"]["pixels"] and raw["weights"] == "raw"


@pytest.mark.slow  # runs the tool several times (matplotlib, seconds)
def test_analyze_levels_of_a_fine_tuned_checkpoint_marks_the_levels_it_does_not_build(images, tmp_path):
    classifier = timm.create_model("revcolv2_tiny", num_classes=4, img_size=SIZE, **TINY)
    _, saved = _analyze(_save(tmp_path / "ft.pth", classifier), images, tmp_path / "cka")
    td = saved["cka"]["pixels"][2]
    assert td[:3] == [None, None, None] and td[3] is not None  # a classifier builds only the top of its TD column
    assert all(v is not None for row in saved["cka"]["pixels"][:2] for v in row)


@pytest.mark.slow  # runs the tool several times (matplotlib, seconds)
def test_analyze_levels_of_another_preset(images, tmp_path):
    large = create_mim_model("revcolv2_large", img_size=SIZE, **TINY)  # 4 BU + 2 TD columns
    _, saved = _analyze(_save(tmp_path / "l.pth", large, variant="revcolv2_large"), images, tmp_path / "cka")
    assert saved["columns"] == ["BU 1", "BU 2", "BU 3", "BU 4", "TD 1", "TD 2"]
    assert saved["model"]["name"] == "revcolv2_large"


@pytest.mark.slow  # runs the tool several times (matplotlib, seconds)
def test_analyze_levels_of_detectron2_checkpoints(images, tmp_path):
    from detectron2.config import LazyConfig, instantiate

    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(str(REPO / "projects" / "RevColV2" / "configs" / "ADE20K" / "upernet_revcolv2_b_160k.py")),
        ["model.backbone.variant=revcolv2_tiny", "model.backbone.embed_dim=32", "model.backbone.num_heads=2",
         "model.backbone.patch_size=8", "model.sem_seg_head.channels=16", "model.sem_seg_head.aux_channels=8"])
    model = instantiate(cfg.model)
    RevColV2Checkpointer(model, str(tmp_path)).save("model_final")  # records the backbone's preset and size
    _, saved = _analyze(tmp_path / "model_final.pth", images, tmp_path / "cka", "--input-size", "32")
    assert saved["columns"] == ["BU 1", "BU 2", "TD 1"] and saved["model"]["kwargs"]["embed_dim"] == 32
    assert all(v is not None for row in saved["cka"]["pixels"] for v in row)  # every level: a dense model
    # a detectron2 checkpoint that records no preset: --model names it
    net = create_mim_model("revcolv2_tiny", img_size=SIZE)
    torch.save({"model": {f"backbone.net.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "old.pth")
    with pytest.raises(SystemExit, match="records no model name"):
        _analyze(tmp_path / "old.pth", images, tmp_path / "old", "--input-size", "32")
    _, old = _analyze(tmp_path / "old.pth", images, tmp_path / "old", "--input-size", "32", "--model", "revcolv2_tiny")
    assert old["tokens"] == 6 * (32 // 16) ** 2
