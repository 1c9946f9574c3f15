"""revcolv2/export.py word for word: what model_from_checkpoint / export_to_folder print (the
weights taken, the load report, what is left out, where the folder went), their silence with
``verbose=False``, the EMA rule through both (EMA by default, raw with ``ema=False``), the
errors naming the checkpoint, the input-size check, and FeatureMaps. Tiny models, in-process,
fast (the ONNX round trips are test_export_onnx.py's)."""
import os

import pytest
import timm
import torch
from safetensors.torch import load_file as load_safetensors

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.atomic_io import current_umask
from revcolv2.checkpoint import CheckpointError
from revcolv2.classification import LinearProbe
from revcolv2.export import (
    ExportError,
    FeatureMaps,
    _group,
    check_img_size,
    export_to_folder,
    model_from_checkpoint,
)
from revcolv2.mim import create_mim_model

# two columns where the preset has three: a layout read from the preset alone would be wrong
TINY = dict(embed_dim=8, num_heads=1, num_levels=2, num_bu_columns=1, num_td_columns=1, blocks_per_level=1)
KEY = "columns.1.levels.1.blocks.0.mlp.fc1.weight"
CONFIG = {"model": {"name": "revcolv2_tiny", "kwargs": TINY}}


def _mim_checkpoint():
    torch.manual_seed(0)
    mim = create_mim_model("revcolv2_tiny", **TINY)
    return mim, {"model": mim.state_dict(), "epoch": 3, "config": CONFIG}


def _ema_checkpoint():
    """A classifier checkpoint with raw and EMA weights that differ."""
    torch.manual_seed(0)
    raw = timm.create_model("revcolv2_tiny", num_classes=4, **TINY).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    return raw, ema, {"model": raw, "model_ema": ema, "config": CONFIG}


def _levels(model, x):
    with torch.no_grad():
        return model.eval().forward_intermediates(x, intermediates_only=True)


def test_a_mim_checkpoint_prints_the_weights_the_report_and_the_pretraining_tensors_left_out(capsys):
    mim, ckpt = _mim_checkpoint()
    model, kwargs = model_from_checkpoint(ckpt)  # preset and sizes from the config, verbose by default
    assert capsys.readouterr().out == (
        "weights: checkpoint: its raw weights (no EMA weights in it) ['model']\n"
        "loaded 55 tensors\n"
        "missing in checkpoint (2): fc_norm.weight, fc_norm.bias\n"
        "left out: 5 pre-training-only tensors (mask_token, decoder_norm.{weight, bias}, decoder_pred.{weight, bias})\n"
    )
    assert kwargs == dict(TINY, num_classes=0)
    x = torch.randn(1, 3, 32, 32)  # every level of the last column is built and loaded
    assert all(torch.equal(a, b) for a, b in zip(_levels(model, x), _levels(mim, x)))


def test_ema_by_default_raw_with_ema_false_and_nothing_printed_without_verbose(capsys):
    raw, ema, ckpt = _ema_checkpoint()
    model, _ = model_from_checkpoint(ckpt)
    assert capsys.readouterr().out.splitlines()[0] == (
        "weights: checkpoint: its EMA weights (--no-ema / ema=False takes 'model') ['model_ema']")
    assert torch.equal(model.state_dict()[KEY], ema[KEY])
    model, kwargs = model_from_checkpoint(ckpt, verbose=False, ema=False)
    assert capsys.readouterr().out == ""
    assert torch.equal(model.state_dict()[KEY], raw[KEY]) and kwargs["num_classes"] == 4


def test_export_to_folder_takes_the_ema_weights_and_says_where_it_wrote(tmp_path, capsys):
    raw, ema, ckpt = _ema_checkpoint()
    out = tmp_path / "ema"
    export_to_folder(ckpt, str(out))
    printed = capsys.readouterr().out.splitlines()
    kwargs = dict(TINY, num_classes=4)
    assert printed[0] == "weights: checkpoint: its EMA weights (--no-ema / ema=False takes 'model') ['model_ema']"
    assert printed[-2:] == [
        f"wrote {out / 'config.json'} and model.safetensors (revcolv2_tiny, {kwargs})",
        f"load it with `import revcolv2; timm.create_model('local-dir:{out}', pretrained=True)` "
        "(importing revcolv2 registers the revcolv2_* presets with timm; without it timm answers "
        "'Unknown model (revcolv2_...)')",
    ]
    assert torch.equal(load_safetensors(str(out / "model.safetensors"))[KEY], ema[KEY])
    # safetensors writes its file 0600: the export gives it a plain file's mode
    assert os.stat(out / "model.safetensors").st_mode & 0o777 == 0o666 & ~current_umask()

    export_to_folder(ckpt, str(tmp_path / "raw"), verbose=False, ema=False)
    assert capsys.readouterr().out == ""
    assert torch.equal(load_safetensors(str(tmp_path / "raw" / "model.safetensors"))[KEY], raw[KEY])


def test_the_weights_line_names_the_file_read(tmp_path, capsys):
    _, ckpt = _mim_checkpoint()
    path = tmp_path / "checkpoint-last.pth"
    torch.save(ckpt, path)
    model_from_checkpoint(str(path))
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"weights: {path}: its raw weights (no EMA weights in it) ['model']"


def test_errors_are_whole_sentences_naming_the_checkpoint():
    with pytest.raises(CheckpointError) as e:  # a loaded checkpoint that is no state dict
        model_from_checkpoint([torch.zeros(1)], "revcolv2_tiny")
    assert str(e.value) == "checkpoint holds a list, not a state dict"
    with pytest.raises(ValueError) as e:
        model_from_checkpoint({"model": timm.create_model("revcolv2_tiny", **TINY).state_dict()})
    assert str(e.value) == "the checkpoint records no model name: give one (e.g. --model revcolv2_base)"
    wide = timm.create_model("revcolv2_tiny", num_classes=0, **dict(TINY, embed_dim=16)).state_dict()
    with pytest.raises(ValueError) as e:
        model_from_checkpoint(wide, "revcolv2_tiny", TINY, verbose=False)
    assert str(e.value) == ("checkpoint: checkpoint tensor 'patch_embed.proj.weight' has shape (16, 3, 16, 16) but "
                            "the model expects (8, 3, 16, 16): the checkpoint is for a different model size")
    # without its last column, the checkpoint is a mismatch naming what is missing
    _, ckpt = _mim_checkpoint()
    cut = {k: v for k, v in ckpt["model"].items() if not k.startswith("columns.1.")}
    with pytest.raises(ValueError) as e:
        model_from_checkpoint(cut, "revcolv2_tiny", TINY, verbose=False)
    assert str(e.value).startswith("checkpoint does not match the model:\nloaded 26 tensors\n"
                                   "missing in checkpoint (19): columns.1.alphas, ")


def test_a_config_without_a_model_entry_takes_the_given_name():
    _, ckpt = _mim_checkpoint()
    model, kwargs = model_from_checkpoint(dict(ckpt, config={"data": {"img_size": 32}}), "revcolv2_tiny", TINY,
                                          verbose=False)
    assert kwargs == dict(TINY, num_classes=0) and model.pretrained_cfg["architecture"] == "revcolv2_tiny"


def test_a_backbone_below_backbone_without_a_probe_head_lists_the_rest(capsys):
    _, ckpt = _mim_checkpoint()
    sd = {"backbone." + k: v for k, v in ckpt["model"].items()}
    sd["neck.weight"] = torch.zeros(2)
    model_from_checkpoint({"model": sd}, "revcolv2_tiny", TINY)
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "taking the RevColV2 model below 'backbone.'",
        "left out: 5 pre-training-only tensors (mask_token, decoder_norm.{weight, bias}, decoder_pred.{weight, bias})",
        "left out: 1 tensors outside the RevColV2 model (neck.{weight})",
    ]


def test_a_linear_probe_checkpoint_says_why_its_head_is_left_out(capsys):
    torch.manual_seed(0)
    probe = LinearProbe(timm.create_model("revcolv2_tiny", num_classes=0, reversible=False, **TINY), 7)
    sd = dict(probe.state_dict(), extra=torch.zeros(1))  # anything beside the probe is still listed
    model, kwargs = model_from_checkpoint({"model": sd, "config": CONFIG})
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "taking the RevColV2 model below 'backbone.'",
        "left out: the linear-probe head (head.0.{running_mean, running_var, num_batches_tracked}, "
        "head.1.{weight, bias}; 7 classes). It reads the last bottom-up level, and timm's RevColV2 classifier "
        "has no head there: the export is the backbone only (num_classes 0). Evaluate the probe with "
        "tools/linear_probe.py --eval --resume CHECKPOINT",
        "left out: 1 tensors outside the RevColV2 model (extra)",
    ]
    assert model.num_classes == 0 == kwargs["num_classes"]


def test_group_lists_names_by_module_the_top_level_ones_first():
    assert _group(["decoder_pred.weight", "mask_token", "a.b.c", "decoder_pred.bias", "pos"]) == \
        "mask_token, pos, a.b.{c}, decoder_pred.{weight, bias}"


def test_check_img_size_takes_positive_multiples_of_the_patch():
    with torch.device("meta"):
        model = timm.create_model("revcolv2_tiny", **TINY)
        pixel = timm.create_model("revcolv2_tiny", patch_size=1, **TINY)
    assert check_img_size(model, 32) is None and check_img_size(pixel, 1) is None
    with pytest.raises(ExportError) as e:
        check_img_size(model, 0)
    assert str(e.value) == ("--img-size 0 is not a positive size; give a multiple of the patch size 16 of the "
                            "checkpoint's model (e.g. --img-size 16)")
    with pytest.raises(ExportError) as e:
        check_img_size(model, -16)
    assert str(e.value) == ("--img-size -16 is not a positive size; give a multiple of the patch size 16 of the "
                            "checkpoint's model (e.g. --img-size 16)")
    with pytest.raises(ExportError) as e:
        check_img_size(model, 1)  # positive: the patch size is what is wrong
    assert str(e.value) == ("--img-size 1 is not divisible by the patch size 16 of the checkpoint's model; "
                            "give a multiple of 16 (e.g. --img-size 16)")
    with pytest.raises(ExportError) as e:
        check_img_size(model, 40)
    assert str(e.value) == ("--img-size 40 is not divisible by the patch size 16 of the checkpoint's model; "
                            "give a multiple of 16 (e.g. --img-size 48)")
    assert e.value.code == str(e.value)  # what SystemExit prints before exiting with status 1


def test_feature_maps_are_the_models_level_maps():
    torch.manual_seed(0)
    model = timm.create_model("revcolv2_tiny", num_classes=0, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = FeatureMaps(model)(x)
    assert isinstance(maps, tuple) and len(maps) == 2
    assert all(torch.equal(a, b) for a, b in zip(maps, _levels(model, x)))
