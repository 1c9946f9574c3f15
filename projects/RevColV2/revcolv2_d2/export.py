"""TorchScript export of a RevColV2 detectron2 model, the way detectron2's own deploy tool
(``facebookresearch/detectron2:tools/deploy/export_model.py``, ``--export-method tracing``) does it.

The model (eval) is wrapped in detectron2's ``TracingAdapter``, which flattens its inputs
and outputs (``Instances``, dicts) to tuples of tensors, and traced with
``torch.jit.trace`` on one image. A Mask R-CNN is traced through
``inference(..., do_postprocess=False)``: the traced model returns boxes, scores, classes
and the 28x28 ROI masks at the input resolution (pasting masks into the image is left to
the caller, as in detectron2). Every given image is then run through both models and the
traced outputs must equal the eager ones.

A trace records one path through the model: the RevColV2 backbone's Python branches
(padding to a multiple of 32, windowed attention) are fixed for the traced input size.
The configs pad every input to one square size (``square_pad``: 1024 for COCO, 256 for the
demo), so that path holds for every image.

Load it back without this project: ``torch.jit.load("model.ts")(image)`` with ``image`` a
(3, H, W) float tensor in the config's input format and resized by its test transform.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.export import TracingAdapter
from detectron2.export.flatten import flatten_to_tuple
from detectron2.modeling import GeneralizedRCNN

from .visualization import LazyPredictor, read_bgr

__all__ = ["export_torchscript", "traced_inference"]

logger = logging.getLogger("detectron2.export")


def traced_inference(model: torch.nn.Module) -> Optional[Callable]:
    """What the trace runs: a Mask R-CNN's ``inference`` without post-processing (ROI
    masks, boxes at the input resolution), as detectron2's export tool; None (the model's
    own forward) for other models."""
    if isinstance(model, GeneralizedRCNN):
        def inference(m, inputs):
            return [{"instances": m.inference(inputs, do_postprocess=False)[0]}]
        return inference
    return None


def _compare(eager: Tuple[torch.Tensor, ...], traced: Tuple[torch.Tensor, ...], name: str) -> float:
    """Largest absolute difference between two flattened outputs; raises if they differ in
    number, shape or dtype."""
    if len(eager) != len(traced):
        raise RuntimeError(f"{name}: the traced model returns {len(traced)} tensors, the eager one {len(eager)}")
    worst = 0.0
    for i, (e, t) in enumerate(zip(eager, traced)):
        if e.shape != t.shape or e.dtype != t.dtype:
            raise RuntimeError(f"{name}: output {i} is {tuple(t.shape)} {t.dtype} traced, "
                               f"{tuple(e.shape)} {e.dtype} eager")
        if e.numel():
            worst = max(worst, (e.double() - t.double()).abs().max().item())
    return worst


def export_torchscript(cfg, checkpoint: str, images: Sequence[str], output_dir: str, ema: bool = True,
                       atol: float = 0.0) -> Dict[str, float]:
    """Trace ``cfg.model`` with ``checkpoint``'s weights on ``images[0]``, write
    ``output_dir/model.ts``, and check the traced model against the eager one on every image.

    Returns {image: largest absolute output difference}; raises ``RuntimeError`` when one
    exceeds ``atol`` (0: the outputs must be equal).
    """
    if not images:
        raise ValueError("export_torchscript needs at least one image to trace with")
    predictor = LazyPredictor(cfg, checkpoint, device="cpu", ema=ema)
    model = predictor.model
    inference = traced_inference(model)
    samples = [predictor.prepare(read_bgr(p))["image"] for p in images]
    adapter = TracingAdapter(model, [{"image": samples[0]}], inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (samples[0],), check_trace=False)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.ts")
    torch.jit.save(traced, path)
    logger.info("wrote %s; inputs %s; outputs %s", path, adapter.inputs_schema, adapter.outputs_schema)

    diffs: Dict[str, float] = {}
    with torch.no_grad():
        for name, image in zip(images, samples):
            eager_out = inference(model, [{"image": image}]) if inference else model([{"image": image}])
            eager, _ = flatten_to_tuple(eager_out)
            diffs[name] = _compare(eager, tuple(traced(image)), name)
    bad = {k: v for k, v in diffs.items() if v > atol}
    if bad:
        raise RuntimeError(f"the traced model differs from the eager one by more than {atol}: {bad}")
    return diffs


def dataset_images(cfg, count: int) -> List[str]:
    """The first ``count`` image files of the config's test dataset (registered here)."""
    from detectron2.data import DatasetCatalog

    from .data import register_all
    from .data.custom import register_config_datasets

    register_all()
    register_config_datasets(cfg)  # a custom config's data (its dataset.* overrides)
    names = cfg.dataloader.test.dataset.names
    name = names if isinstance(names, str) else names[0]
    return [r["file_name"] for r in DatasetCatalog.get(name)[:count]]
