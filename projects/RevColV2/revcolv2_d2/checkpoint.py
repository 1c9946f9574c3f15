"""detectron2 checkpointer that reads RevColV2 (timm-style) checkpoints and saves atomically.

``train.init_checkpoint`` may point at:
- a detectron2 checkpoint of this project (keys already match), or
- a RevColV2 MIM / classification checkpoint (keys ``patch_embed.*``, ``columns.*``, ...):
  they are renamed to the model's RevColV2 module (e.g. ``backbone.bottom_up.net.``),
  the pre-training / classification-only tensors are dropped, and every key is reported.
A tensor whose shape differs from the model's is an error naming it (never skipped).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _group_checkpoint_keys, _group_to_str

from revcolv2.checkpoint import PRETRAIN_ONLY_PREFIXES, save_atomic, unwrap_state_dict
from revcolv2.model import RevColV2

logger = logging.getLogger("detectron2").getChild(__name__)  # shown by default_setup

# tensors of a RevColV2 checkpoint that a dense-prediction model does not use
_DROPPED_PREFIXES = PRETRAIN_ONLY_PREFIXES + ("head.", "fc_norm.")


def _revcolv2_prefix(model: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, RevColV2):
            return name + "." if name else ""
    raise ValueError("the model holds no RevColV2 module to load a RevColV2 checkpoint into")


def is_revcolv2_state_dict(sd: Dict[str, Any]) -> bool:
    return any(k.startswith(("patch_embed.", "columns.")) for k in sd)


def convert_revcolv2_state_dict(sd: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Rename a RevColV2 state dict to ``model``'s names; report what was dropped."""
    prefix = _revcolv2_prefix(model)
    dropped = sorted(k for k in sd if k.startswith(_DROPPED_PREFIXES))
    if dropped:
        logger.info("RevColV2 checkpoint: not used by the dense model (%d):\n%s", len(dropped), _grouped(dropped))
    return {prefix + k: v for k, v in sd.items() if not k.startswith(_DROPPED_PREFIXES)}


def _grouped(keys) -> str:
    """One line per module: ``prefix.{a, b}``, as fvcore prints missing/unused keys."""
    groups = _group_checkpoint_keys(list(keys))
    return "\n".join("  " + prefix + _group_to_str(tails) for prefix, tails in sorted(groups.items()))


class RevColV2Checkpointer(DetectionCheckpointer):
    def _load_file(self, filename: str) -> Dict[str, Any]:
        loaded = super()._load_file(filename)
        sd = loaded.get("model", loaded)
        if isinstance(sd, dict) and not is_revcolv2_state_dict(sd):
            # a wrapped RevColV2 checkpoint ({'model': ...}, {'state_dict': ...})
            try:
                inner = unwrap_state_dict(sd)
            except ValueError:
                inner = {}
            if is_revcolv2_state_dict(inner):
                sd = inner
        if isinstance(sd, dict) and is_revcolv2_state_dict(sd):
            return {"model": convert_revcolv2_state_dict(unwrap_state_dict(sd), self.model),
                    "__author__": "revcolv2"}
        return loaded

    def _load_model(self, checkpoint: Dict[str, Any]):
        own = self.model.state_dict()
        for k, v in checkpoint["model"].items():
            if k in own and hasattr(v, "shape") and tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(
                    f"checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                    f"{tuple(own[k].shape)}: the checkpoint is for a different model size"
                )
        loaded = [k for k in checkpoint["model"] if k in own]  # fvcore pops "model" below
        incompatible = super()._load_model(checkpoint)
        # fvcore then logs the missing and unused keys by name (_log_incompatible_keys)
        self.logger.info(
            "Loaded %d tensors; %d missing in the checkpoint; %d unused from the checkpoint. Loaded:\n%s",
            len(loaded), len(incompatible.missing_keys), len(incompatible.unexpected_keys),
            _grouped(loaded),
        )
        return incompatible

    def save(self, name: str, **kwargs: Any) -> None:
        """Like fvcore's save, but written to a temporary file and renamed into place."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        save_atomic(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
        os.replace(tmp, path)
