"""Load a detectron2 LazyConfig without letting a YAML file run code.

detectron2's ``LazyConfig.load`` reads ``.yaml`` with ``yaml.unsafe_load``, which builds
arbitrary Python objects (``!!python/object/apply:os.system [...]`` runs a command). Here a
YAML config is data, in two checks:

- it is parsed by ``yaml.SafeLoader`` plus the one Python object that ``LazyConfig.save``
  writes into the ``config.yaml`` of our Mask R-CNN configs, detectron2's ``ShapeSpec``
  (four optional integers); any other Python tag is an error naming the file;
- every ``_target_`` (the callables ``instantiate`` will call) must resolve to one of
  :data:`ALLOWED_TARGETS`, named callables each reviewed for file reading, imports and
  ``eval`` (the reason is written next to it), and gives none of the arguments
  :data:`FORBIDDEN_ARGUMENTS` names (``proposal_files``, which detectron2 reads with
  ``pickle.load``; ``cfg``, which makes a ``@configurable`` callable build itself from a
  detectron2 config). ``os.system``, ``torch.hub.load``, ``builtins.exec`` or
  ``detectron2.data.build.load_proposals_into_dataset`` are refused with an error naming
  the key and the target, and so is a name that only reaches such a function through an
  allowed module (``revcolv2_d2.backbone.torch.hub.load``). Nothing outside the packages on
  the way to an allowed callable is imported to check a name.

Python LazyConfigs (``.py``) are code by design and are executed as detectron2 does: run
only ``.py`` configs you trust. Command-line overrides are not checked: they are yours.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import yaml
from detectron2.config import LazyConfig
from omegaconf import DictConfig, OmegaConf

# --------------------------------------------------------------------------- what a YAML may call
# Every class or function a YAML config may name as a ``_target_``, by the name it is
# defined under (``module.qualname``; an alias such as ``detectron2.modeling.FPN`` resolves to
# it), each with the reason it is safe to call with a config's arguments: reviewed for file
# reading, imports and ``eval``. The set is what the saved config.yaml of every config in
# projects/RevColV2/configs names (tests/test_yaml_config.py saves and reloads each one),
# plus the close neighbours a variant of them would take. To add one: read its code (and that
# of what it calls with its arguments), add a line with the reason, and name any argument
# that reads a file or imports by name in FORBIDDEN_ARGUMENTS; docs/OPERATIONS.md lists them
# (a test checks that every name here is there).
_COMPUTES = "reads no file, imports nothing by name, evaluates no string"
_MODULE = f"a model part built from numbers, shapes and the modules given to it: {_COMPUTES}"
_AUGMENTATION = f"an image augmentation built from numbers: {_COMPUTES}"
_SCHEDULE = f"a schedule of numbers (an fvcore ParamScheduler): {_COMPUTES}"
_OPTIMIZER = f"an optimizer over the parameters given to it: {_COMPUTES}"
_PARAM_GROUPS = f"optimizer parameter groups of the model given to it (by parameter name): {_COMPUTES}"
_MAPPER = ("turns a dataset record into model input: reads the record's image (and label) files as images "
           f"(PIL / OpenCV), which cannot run code; otherwise {_COMPUTES}")
_LOADER = f"a DataLoader over the records and mapper given to it: {_COMPUTES}"
_REVCOLV2 = (f"{_MODULE}. It builds RevColV2 through create_revcolv2 (timm's build_model_with_cfg); the "
             "arguments that would make timm read a weights file or download from the Hub are refused")
ALLOWED_TARGETS: Dict[str, str] = {
    # data: records, mappers, augmentations, loaders
    "detectron2.data.build.get_detection_dataset_dicts":
        "the records of datasets registered by name: runs only the loaders registered in DatasetCatalog (this "
        "project's built-in datasets, detectron2's COCO / ADE20K / ...), which parse JSON, XML and image files; "
        "proposal_files is refused (detectron2 reads proposal files with pickle.load)",
    "detectron2.data.build.build_detection_train_loader": _LOADER + " (the train loader that older runs' "
                                                                     "config.yaml names)",
    "detectron2.data.build.build_detection_test_loader": _LOADER,
    "revcolv2_d2.data.loader.build_train_loader": _LOADER + " (the train loader of every config)",
    "detectron2.data.dataset_mapper.DatasetMapper": _MAPPER,
    "revcolv2_d2.data.coco_checks.CheckedDatasetMapper": _MAPPER,
    "revcolv2_d2.data.ade20k.SemSegDatasetMapper": _MAPPER,
    **{f"detectron2.data.transforms.augmentation_impl.{name}": _AUGMENTATION for name in (
        "ResizeShortestEdge", "RandomFlip", "ResizeScale", "FixedSizeCrop", "RandomCrop",
        "RandomCrop_CategoryAreaConstraint", "Resize", "RandomBrightness", "RandomContrast", "RandomSaturation",
        "RandomLighting", "RandomRotation")},
    "revcolv2_d2.data.ade20k.PhotometricDistortion": _AUGMENTATION,
    "revcolv2_d2.data.ade20k.ResizeLongShortScale": _AUGMENTATION,
    # your own data (configs/custom/): detectron2's registration of a COCO-format JSON or of
    # image + label-PNG folders, and the class count read from the same files
    "revcolv2_d2.data.custom.register_coco_format":
        "registers a COCO-format JSON and image folder through detectron2's register_coco_instances (json, "
        f"pycocotools, images read as images when the data is loaded); otherwise {_COMPUTES}",
    "revcolv2_d2.data.custom.coco_num_classes":
        "counts the categories of COCO-format JSON files, read with json (which runs no code); imports nothing "
        "by name, evaluates no string",
    "revcolv2_d2.data.custom.register_sem_seg_folders":
        "registers image and label-PNG folders through detectron2's load_sem_seg (file names; the images are read "
        f"as images when the data is loaded) and reads the class-list text file; otherwise {_COMPUTES}",
    "revcolv2_d2.data.custom.sem_seg_num_classes":
        "counts the class names given, or the lines of a class-list text file (read as text); imports nothing "
        "by name, evaluates no string",
    # evaluation
    "detectron2.evaluation.coco_evaluation.COCOEvaluator":
        "reads the dataset's JSON annotations (pycocotools, json) and writes its results into output_dir when "
        "one is given; imports only its fixed modules",
    "detectron2.evaluation.sem_seg_evaluation.SemSegEvaluator":
        "reads the dataset's label images (PIL) and writes its results into output_dir when one is given",
    "detectron2.evaluation.evaluator.DatasetEvaluators": f"combines the evaluators given to it: {_COMPUTES}",
    # models
    "detectron2.layers.shape_spec.ShapeSpec": f"four optional integers: {_COMPUTES}",
    **{f"detectron2.modeling.{name}": _MODULE for name in (
        "anchor_generator.DefaultAnchorGenerator", "backbone.fpn.FPN", "backbone.fpn.LastLevelMaxPool",
        "backbone.fpn.LastLevelP6P7", "box_regression.Box2BoxTransform", "matcher.Matcher",
        "meta_arch.rcnn.GeneralizedRCNN", "poolers.ROIPooler", "proposal_generator.rpn.RPN",
        "proposal_generator.rpn.StandardRPNHead", "roi_heads.box_head.FastRCNNConvFCHead",
        "roi_heads.cascade_rcnn.CascadeROIHeads", "roi_heads.fast_rcnn.FastRCNNOutputLayers",
        "roi_heads.mask_head.MaskRCNNConvUpsampleHead", "roi_heads.roi_heads.StandardROIHeads")},
    **{f"torch.nn.modules.{name}": _MODULE for name in (
        "container.Sequential", "linear.Identity", "linear.Linear", "conv.Conv2d", "activation.ReLU",
        "activation.GELU", "normalization.LayerNorm", "normalization.GroupNorm", "batchnorm.BatchNorm2d",
        "batchnorm.SyncBatchNorm", "dropout.Dropout")},
    "revcolv2_d2.backbone.RevColV2Backbone": _REVCOLV2,
    "revcolv2_d2.backbone.revcolv2_level_shapes": _REVCOLV2 + " (built on the meta device for its output shapes)",
    "revcolv2_d2.upernet.UPerHead": _MODULE,
    "revcolv2_d2.upernet.RevColV2SemanticSegmentor": _MODULE,
    "revcolv2_d2.mask2former.Mask2FormerHead": _MODULE + " (Hugging Face's Mask2Former modules, built from a "
                                                          "config of numbers, never from_pretrained)",
    "revcolv2_d2.mask2former.RevColV2Mask2Former": _MODULE,
    # optimization
    "torch.optim.adamw.AdamW": _OPTIMIZER,
    "torch.optim.adam.Adam": _OPTIMIZER,
    "torch.optim.sgd.SGD": _OPTIMIZER,
    "revcolv2_d2.mask2former.FullModelGradClipAdamW": _OPTIMIZER,
    "detectron2.solver.build.get_default_optimizer_params": _PARAM_GROUPS,
    "revcolv2_d2.backbone.revcolv2_optimizer_params": _PARAM_GROUPS,
    "revcolv2_d2.mask2former.mask2former_optimizer_params": _PARAM_GROUPS,
    "revcolv2.layer_decay.lr_factor_func": f"the layer-decay factor of each parameter name of a model: {_COMPUTES}",
    "detectron2.solver.lr_scheduler.WarmupParamScheduler": _SCHEDULE,
    "revcolv2_d2.schedules.vitdet_multistep": _SCHEDULE + " (ViTDet's step schedule, for a given max_iter)",
    "revcolv2_d2.schedules.warmup_poly": _SCHEDULE + " (warm-up then polynomial decay, for a given max_iter)",
    **{f"fvcore.common.param_scheduler.{name}": _SCHEDULE for name in (
        "MultiStepParamScheduler", "PolynomialDecayParamScheduler", "CosineParamScheduler", "LinearParamScheduler",
        "ConstantParamScheduler", "StepParamScheduler", "StepWithFixedGammaParamScheduler",
        "CompositeParamScheduler")},
}

_TIMM_WEIGHTS = "timm would read a weights file or download from the Hub: weights come through train.init_checkpoint"
# Arguments a YAML may not give to an allowed callable, with the reason.
FORBIDDEN_ARGUMENTS: Dict[str, Dict[str, str]] = {
    "detectron2.data.build.get_detection_dataset_dicts": {
        "proposal_files": "detectron2 reads proposal files with pickle.load, which runs code"},
    **{name: {k: _TIMM_WEIGHTS for k in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay")}
       for name in ("revcolv2_d2.backbone.RevColV2Backbone", "revcolv2_d2.backbone.revcolv2_level_shapes")},
}
# ... and to any of them: detectron2's @configurable callables build themselves from a
# detectron2 config given as ``cfg`` (their ``from_config``), which loads proposal pickles
# (MODEL.LOAD_PROPOSALS) and builds registry entries by name
FORBIDDEN_EVERYWHERE = {"cfg": "a detectron2 config given as 'cfg' makes a @configurable callable build itself "
                               "through its from_config, which can load proposal files with pickle.load"}

_SHAPE_SPEC_TAG = "tag:yaml.org,2002:python/object:detectron2.layers.shape_spec.ShapeSpec"


class UnsafeConfigError(ValueError):
    """A YAML config that asks for code or objects a config may not hold; names the file."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also builds detectron2's ``ShapeSpec`` (and nothing else)."""


def _shape_spec(loader: _ConfigLoader, node: yaml.Node):
    from detectron2.layers import ShapeSpec

    fields = loader.construct_mapping(node, deep=True)
    allowed = {"channels", "height", "width", "stride"}
    if set(fields) - allowed or not all(v is None or type(v) is int for v in fields.values()):
        raise yaml.constructor.ConstructorError(None, None, f"a ShapeSpec holds optional integers {sorted(allowed)}, "
                                                f"not {fields!r}", node.start_mark)
    return ShapeSpec(**fields)


_ConfigLoader.add_constructor(_SHAPE_SPEC_TAG, _shape_spec)


def load_lazy_config(path: str) -> DictConfig:
    """``LazyConfig.load``; a YAML file is read as data and its ``_target_`` entries are
    checked against :data:`ALLOWED_TARGETS` and their arguments against
    :data:`FORBIDDEN_ARGUMENTS` (:class:`UnsafeConfigError` otherwise)."""
    if os.path.splitext(path)[1] not in (".yaml", ".yml"):
        return LazyConfig.load(path)
    try:
        with open(path) as f:
            obj = yaml.load(f, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        # every ConstructorError a SafeLoader raises (and _shape_spec's) marks its node; the guard is for other loaders
        where = f"line {e.problem_mark.line + 1}" if e.problem_mark else "it"
        raise UnsafeConfigError(
            f"refusing to load {path}: a YAML config may hold only plain data, but {where} asks for a Python "
            f"object ({e.problem.strip() if e.problem else e}). Loading it with detectron2's "
            "yaml.unsafe_load could run arbitrary code"
        ) from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if obj is None:
        raise ValueError(f"{path} is empty, not a config (a mapping of keys)")
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a config (a mapping of keys)")
    for key, target, node in _targets(obj):
        check_target(target, key, path, node)
    return OmegaConf.create(obj, flags={"allow_objects": True})


def _targets(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any, dict]]:
    """(dotted key, value, the mapping that holds it) of every ``_target_`` in a parsed YAML document."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if k == "_target_":
            yield key, v, node
        yield from _targets(v, key + ".")


def _may_resolve(target: str) -> bool:
    """Whether resolving ``target`` imports only packages on the way to an allowed callable:
    it is an allowed name, or ``package.Name`` where an allowed name is ``package.....Name``
    (an alias, e.g. ``detectron2.modeling.FPN``). Anything else is refused unimported."""
    parent, _, leaf = target.rpartition(".")
    return any(name == target or (parent and name.startswith(parent + ".") and name.endswith("." + leaf))
               for name in ALLOWED_TARGETS)


def check_target(target: Any, key: str, path: str, node: Optional[dict] = None) -> None:
    """Raise :class:`UnsafeConfigError` unless ``target`` resolves to a callable of
    :data:`ALLOWED_TARGETS` (the name is resolved, so a path through an allowed module to
    something else does not pass) and ``node``, the mapping that holds it, gives it no
    argument of :data:`FORBIDDEN_ARGUMENTS` / :data:`FORBIDDEN_EVERYWHERE`."""
    def refuse(why: str) -> UnsafeConfigError:
        return UnsafeConfigError(
            f"refusing to load {path}: {key} is {target!r}, {why}. A YAML config may instantiate only the classes "
            "and functions of revcolv2_d2.safe_config.ALLOWED_TARGETS (listed, each with why it is safe, in "
            "docs/OPERATIONS.md); write a .py config (code you review) for anything else")

    if not isinstance(target, str):
        raise refuse("not a dotted name")
    if not _may_resolve(target):
        raise refuse("not one of the callables a YAML config may name")
    from detectron2.utils.registry import locate

    try:
        obj = locate(target)  # imports only packages on the way to an allowed callable: checked above
    except Exception as e:  # noqa: BLE001 - locate raises ImportError or others for a bad name
        first_line = str(e).strip().partition("\n")[0]  # hydra's ImportError spans several lines
        raise refuse(f"which cannot be found ({type(e).__name__}: {first_line})") from None
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        what = (f"the module {obj.__name__}" if inspect.ismodule(obj)
                else f"an instance of {type(obj).__module__}.{type(obj).__qualname__}")
        raise refuse(f"which is {what}, not one of the callables a YAML config may name")
    name = f"{obj.__module__}.{obj.__qualname__}"
    if name not in ALLOWED_TARGETS:
        raise refuse(f"which is {name}, not one of the callables a YAML config may name")
    forbidden = {**FORBIDDEN_EVERYWHERE, **FORBIDDEN_ARGUMENTS.get(name, {})}
    for arg in node or {}:
        if arg in forbidden:
            raise UnsafeConfigError(f"refusing to load {path}: {key} is {target!r} with the argument {arg!r}, which "
                                    f"a YAML config may not give it: {forbidden[arg]}")
