"""Export a RevColV2 checkpoint for use elsewhere.

- :func:`export_to_folder`: a timm / Hugging Face folder (``config.json`` +
  ``model.safetensors``), written by timm's own ``save_for_hf``.
- :func:`export_onnx`: an ONNX file of the classifier (logits) or of the backbone (the four
  level maps), through ``torch.onnx.export(dynamo=True)`` with a dynamic batch, checked
  under onnxruntime.

Accepted checkpoints: MIM pre-training, classification fine-tuning and linear-probe
checkpoints of ``tools/pretrain.py`` / ``tools/finetune.py`` / ``tools/linear_probe.py`` (a
``config`` entry names the preset and its size overrides), raw RevColV2 state dicts, and
detectron2 checkpoints of ``projects/RevColV2`` (the backbone's ``...net.*`` tensors are
taken). Every file is read with the project's safe loader (``revcolv2.checkpoint.load_file``:
nothing in it can run code). What the export leaves out is listed: tensors outside the
RevColV2 model (a detectron2 FPN and heads, a linear probe's head) and the pre-training-only
ones (mask token, reconstruction head).

The folder loads back, after ``import revcolv2`` (which registers the presets with timm;
without it timm answers ``Unknown model (revcolv2_...)``), with either of

    timm.create_model("local-dir:FOLDER", pretrained=True)
    timm.create_model("revcolv2_base", pretrained=True,
                      pretrained_cfg_overlay=dict(file="FOLDER/model.safetensors"))

(the second builds the preset's sizes and its 1000-class head: pass ``num_classes`` and
``pretrained_cfg_overlay["num_classes"]`` to keep an exported classifier). The folder holds
every level the checkpoint has: ``features_only=True`` loads all of them from a MIM or
detectron2 export, a classifier takes what it builds (``checkpoint_filter_fn``).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.models._hub import save_for_hf
from torch import nn

from .atomic_io import follow_umask
from .checkpoint import PRETRAIN_ONLY_PREFIXES, load_checkpoint, load_file, select_weights
from .model import RevColV2, create_revcolv2

__all__ = ["backbone_state_dict", "export_to_folder", "export_onnx", "model_from_checkpoint", "LOAD_NOTE",
           "ExportError", "check_img_size"]

_STEM_KEY = "patch_embed.proj.weight"
# a LinearProbe checkpoint: the RevColV2 model below "backbone.", the probe's head beside it
_PROBE_HEAD = ("head.1.weight", "head.1.bias")

LOAD_NOTE = ("importing revcolv2 registers the revcolv2_* presets with timm; without it timm answers "
             "'Unknown model (revcolv2_...)'")


def backbone_state_dict(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """The RevColV2 tensors of ``sd`` under their own names, and the prefix they had.

    A detectron2 model keeps the backbone below a prefix (``backbone.bottom_up.net.`` for
    Mask R-CNN, ``backbone.net.`` for UperNet), a linear probe below ``backbone.``;
    everything outside it is not part of the RevColV2 model.
    """
    prefixes = [k[: -len(_STEM_KEY)] for k in sd if k.endswith(_STEM_KEY)]
    if len(prefixes) != 1:
        raise ValueError(
            f"expected exactly one RevColV2 patch embedding ('*{_STEM_KEY}') in the checkpoint, "
            f"found {len(prefixes)}: {prefixes}"
        )
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix


def _group(keys: Sequence[str]) -> str:
    """``a.b.{x, y}, c (1)``: left-out tensor names, grouped by their module."""
    groups: Dict[str, List[str]] = defaultdict(list)
    for k in keys:
        module, _, leaf = k.rpartition(".")
        groups[module].append(leaf)
    return ", ".join(f"{m}.{{{', '.join(v)}}}" if m else ", ".join(v) for m, v in sorted(groups.items()))


def _recorded_model(checkpoint: Any) -> Tuple[Optional[str], Dict[str, Any]]:
    """Preset name and constructor overrides recorded in a training checkpoint's config."""
    cfg = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    model_cfg = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    return model_cfg.get("name"), dict(model_cfg.get("kwargs") or {})


def _held_levels(sd: Dict[str, torch.Tensor], num_columns: int) -> List[int]:
    """The levels of the last column that ``sd`` has tensors for."""
    head = f"columns.{num_columns - 1}.levels."
    return sorted({int(k[len(head):].split(".", 1)[0]) for k in sd if k.startswith(head)})


def model_from_checkpoint(
    checkpoint: Any,
    model_name: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    verbose: bool = True,
    ema: bool = True,
) -> Tuple[RevColV2, Dict[str, Any]]:
    """The RevColV2 model a checkpoint holds, with its weights; and its constructor overrides.

    ``checkpoint`` is a path (read safely) or a loaded checkpoint. The preset
    (``model_name``) and its size overrides (``model_kwargs``) default to those recorded in a
    training checkpoint; the number of classes is the checkpoint's classifier's (0 without
    one); the model builds the levels the checkpoint has; the weights follow the project's
    one rule (EMA where present, unless ``ema=False``). A tensor of another shape than the
    model's is an error naming it. With ``verbose``, what is taken and left out is printed.
    """
    source = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = load_file(checkpoint)  # nothing in the file can run code
    recorded_name, recorded_kwargs = _recorded_model(checkpoint)
    model_name = model_name or recorded_name
    if not model_name:
        raise ValueError("the checkpoint records no model name: give one (e.g. --model revcolv2_base)")
    kwargs = dict(recorded_kwargs, **(model_kwargs or {}))
    full, _ = select_weights(checkpoint, ema=ema, source=source, log=print if verbose else None)
    sd, prefix = backbone_state_dict(full)
    outside = [k for k in full if not k.startswith(prefix)]
    pretrain_only = [k for k in sd if k.startswith(PRETRAIN_ONLY_PREFIXES)]
    sd = {k: v for k, v in sd.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}
    kwargs["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    with torch.device("meta"):  # the layout only: how many columns and levels
        layout = create_revcolv2(model_name, **dict(kwargs, num_classes=0))
    held = _held_levels(sd, len(layout.columns))
    model = create_revcolv2(model_name, out_levels=held or "top", **kwargs)
    # MIM and detectron2 backbones have no classifier norm: it keeps its initial identity
    load_checkpoint(model, sd, allow_missing=("fc_norm.",), verbose=verbose, source=source)
    if verbose:
        if prefix:
            print(f"taking the RevColV2 model below '{prefix}'")
        if pretrain_only:
            print(f"left out: {len(pretrain_only)} pre-training-only tensors ({_group(pretrain_only)})")
        if prefix == "backbone." and all(k in full for k in _PROBE_HEAD):
            probe = [k for k in outside if k.startswith("head.")]
            print(f"left out: the linear-probe head ({_group(probe)}; {full[_PROBE_HEAD[0]].shape[0]} classes). "
                  "It reads the last bottom-up level, and timm's RevColV2 classifier has no head there: "
                  "the export is the backbone only (num_classes 0). Evaluate the probe with "
                  "tools/linear_probe.py --eval --resume CHECKPOINT")
            outside = [k for k in outside if k not in probe]
        if outside:
            print(f"left out: {len(outside)} tensors outside the RevColV2 model ({_group(outside)})")
    return model, kwargs


def export_to_folder(
    checkpoint: Any,
    output: str,
    model_name: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    verbose: bool = True,
    ema: bool = True,
) -> RevColV2:
    """Write ``output/config.json`` + ``output/model.safetensors``; returns the exported model.

    See :func:`model_from_checkpoint` for what is taken from ``checkpoint``. ``config.json``
    records the preset's overrides but not which levels the checkpoint held, so
    ``timm.create_model("local-dir:...")`` builds the default classifier (its top level).
    """
    model, kwargs = model_from_checkpoint(checkpoint, model_name, model_kwargs, verbose, ema)
    save_for_hf(model, output, model_args=kwargs, safe_serialization=True)
    follow_umask(os.path.join(output, "model.safetensors"))  # safetensors writes it 0600
    if verbose:
        name = model.pretrained_cfg["architecture"]
        print(f"wrote {os.path.join(output, 'config.json')} and model.safetensors ({name}, {kwargs})")
        print(f"load it with `import revcolv2; timm.create_model('local-dir:{output}', pretrained=True)` "
              f"({LOAD_NOTE})")
    return model


class FeatureMaps(nn.Module):
    """The backbone as an exportable module: images -> its ``num_levels`` level maps (B, D, H/p, W/p)."""

    def __init__(self, model: RevColV2):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_intermediates(x, intermediates_only=True))


class ExportError(SystemExit):
    """An export that cannot be made as asked (an input size the model cannot take, an
    output that would replace an input). A ``SystemExit``: ``tools/export.py`` stops with
    this one-line message (status 1), before the exporter runs."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_img_size(model: RevColV2, img_size: int) -> None:
    """:class:`ExportError` unless ``img_size`` is a positive multiple of the model's patch
    size (the model's own input check, made before the exporter traces it)."""
    patch = model.patch_size
    if img_size <= 0 or img_size % patch:
        nearest = max(patch, -(-img_size // patch) * patch)  # the next multiple up
        why = (f"is not a positive size; give a multiple of the patch size {patch} of the checkpoint's model"
               if img_size <= 0 else
               f"is not divisible by the patch size {patch} of the checkpoint's model; give a multiple of {patch}")
        raise ExportError(f"--img-size {img_size} {why} (e.g. --img-size {nearest})")


def export_onnx(
    model: RevColV2,
    path: str,
    img_size: int = 224,
    features: Optional[bool] = None,
    batch: int = 2,
    check_batches: Sequence[int] = (1, 3),
    atol: float = 1e-4,
    verbose: bool = True,
) -> float:
    """Write ``model`` (eval) to ``path`` as ONNX with a dynamic batch; returns the largest
    absolute difference to PyTorch under onnxruntime (CPU) over ``check_batches``.

    ``features`` (default: when the model has no classifier) exports the level maps
    instead of the logits. An ``img_size`` the model cannot take is an :class:`ExportError`
    before anything runs; the folder of ``path`` is created. Raises ``RuntimeError`` when a
    difference exceeds ``atol``.
    """
    import onnxruntime as ort

    check_img_size(model, img_size)
    model = model.eval()
    features = model.num_classes == 0 if features is None else features
    module = (FeatureMaps(model) if features else model).eval()
    x = torch.randn(batch, model.patch_embed.in_chans, img_size, img_size)
    names = [f"level{l}" for l in range(model.num_levels)] if features else ["logits"]
    dims = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    with torch.no_grad():
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=dims,
                                    input_names=["images"], output_names=names, verbose=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as every output of the project
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in check_batches:
        x = torch.randn(b, model.patch_embed.in_chans, img_size, img_size)
        with torch.no_grad():
            ref = module(x)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session.run(None, {"images": x.numpy()})
        for name, r, g in zip(names, ref, got):
            if tuple(g.shape) != tuple(r.shape):
                raise RuntimeError(f"{path}: output {name} has shape {tuple(g.shape)} under onnxruntime, "
                                   f"PyTorch gives {tuple(r.shape)} (batch {b})")
            worst = max(worst, (torch.from_numpy(g) - r).abs().max().item())
    if worst > atol:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {worst:.3g} (> {atol}) on "
                           f"batches {tuple(check_batches)}")
    if verbose:
        what = (f"the {len(names)} level maps ({', '.join(names)})" if features
                else f"logits ({model.num_classes} classes)")
        print(f"wrote {path}: {what}, input 'images' (batch dynamic, "
              f"{model.patch_embed.in_chans}x{img_size}x{img_size}); "
              f"onnxruntime matches PyTorch to {worst:.2g} on batches {tuple(check_batches)}")
    return worst
