"""Export a RevColV2 checkpoint as a timm / Hugging Face folder (``config.json`` +
``model.safetensors``), written by timm's own ``save_for_hf``.

Accepted checkpoints: MIM pre-training and classification fine-tuning checkpoints of
``tools/pretrain.py`` / ``tools/finetune.py`` (a ``config`` entry names the preset and its
size overrides), raw RevColV2 state dicts, and detectron2 checkpoints of
``projects/RevColV2`` (the backbone's ``...net.*`` tensors are taken, FPN and heads left
out). The folder loads back with either of

    timm.create_model("local-dir:FOLDER", pretrained=True)
    timm.create_model("revcolv2_base", pretrained=True,
                      pretrained_cfg_overlay=dict(file="FOLDER/model.safetensors"))

(the second builds the preset's sizes and its 1000-class head: pass ``num_classes`` and
``pretrained_cfg_overlay["num_classes"]`` to keep an exported classifier).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from timm.models._hub import save_for_hf

from .checkpoint import PRETRAIN_ONLY_PREFIXES, load_checkpoint, load_file, unwrap_state_dict
from .model import RevColV2
from .run_dir import follow_umask

__all__ = ["backbone_state_dict", "export_to_folder"]

_STEM_KEY = "patch_embed.proj.weight"


def backbone_state_dict(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """The RevColV2 tensors of ``sd`` under their own names, and the prefix they had.

    A detectron2 model keeps the backbone below a prefix (``backbone.bottom_up.net.`` for
    Mask R-CNN, ``backbone.net.`` for UperNet); everything outside it is dropped.
    """
    prefixes = [k[: -len(_STEM_KEY)] for k in sd if k.endswith(_STEM_KEY)]
    if len(prefixes) != 1:
        raise ValueError(
            f"expected exactly one RevColV2 patch embedding ('*{_STEM_KEY}') in the checkpoint, "
            f"found {len(prefixes)}: {prefixes}"
        )
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix


def _model_from_checkpoint(checkpoint: Any) -> Tuple[Optional[str], Dict[str, Any]]:
    """Preset name and constructor overrides recorded in a training checkpoint's config."""
    cfg = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    model_cfg = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    return model_cfg.get("name"), dict(model_cfg.get("kwargs") or {})


def export_to_folder(
    checkpoint: Any,
    output: str,
    model_name: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    verbose: bool = True,
) -> RevColV2:
    """Write ``output/config.json`` + ``output/model.safetensors``; returns the exported model.

    ``checkpoint`` is a path or a loaded checkpoint. The preset (``model_name``) and its size
    overrides (``model_kwargs``) default to those recorded in a training checkpoint; the
    number of classes is the checkpoint's classifier's (0 without one). A tensor of another
    shape than the model's is an error naming it.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_file(checkpoint)  # nothing in the file can run code
    recorded_name, recorded_kwargs = _model_from_checkpoint(checkpoint)
    model_name = model_name or recorded_name
    if not model_name:
        raise ValueError("the checkpoint records no model name: give one (e.g. --model revcolv2_base)")
    kwargs = dict(recorded_kwargs, **(model_kwargs or {}))
    sd, prefix = backbone_state_dict(unwrap_state_dict(checkpoint))
    if verbose and prefix:
        print(f"taking the RevColV2 backbone below '{prefix}'")
    sd = {k: v for k, v in sd.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}
    kwargs["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    model = timm.create_model(model_name, **kwargs)  # timm records the arguments for config.json
    # MIM and detectron2 backbones have no classifier norm: it keeps its initial identity
    load_checkpoint(model, sd, allow_missing=("fc_norm.",), verbose=verbose)
    save_for_hf(model, output, safe_serialization=True)
    follow_umask(os.path.join(output, "model.safetensors"))  # safetensors writes it 0600
    if verbose:
        print(f"wrote {os.path.join(output, 'config.json')} and model.safetensors ({model_name}, {kwargs})")
    return model
