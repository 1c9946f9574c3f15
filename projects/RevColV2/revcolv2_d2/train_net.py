"""Train / evaluate a RevColV2 detectron2 LazyConfig, the way detectron2 users know it.

    python tools/lazyconfig_train_net.py --config-file projects/RevColV2/configs/COCO/mask_rcnn_revcolv2_b_50ep.py
    python tools/lazyconfig_train_net.py --config-file CFG --num-gpus 8 train.amp.precision=bf16
    python tools/lazyconfig_train_net.py --config-file CFG --resume          # continue from output_dir
    python tools/lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=model.pth

Besides detectron2's own tool: RevColV2 checkpoints (MIM or classification) load through
``train.init_checkpoint`` (their EMA weights where they have them, unless ``--no-ema``);
no file is loaded in a way that can run code (checkpoints with ``weights_only``, ``.pkl``
with a restricted unpickler, YAML configs with a safe loader; ``.py`` configs are code);
checkpoints are written atomically; ``train.amp.precision`` picks bf16 or fp16 (mixed
precision is switched off on CPU); the project's built-in datasets are registered.
And, for reliability:

- an override whose key is not in the config is an error naming it (with the closest key);
  ``+key=value`` adds a new key, as in Hydra;
- a ``train.output_dir`` that holds a run is refused unless ``--resume`` (continue it) or
  ``--overwrite`` (delete its checkpoints, metrics and evaluation, and start again) is
  given, and a folder another live run trains into is refused, naming its pid;
- SIGTERM / SIGINT (a scheduler, Ctrl-C) write ``model_<iter>.pth`` at the current
  iteration and exit with 143 / 130, also under ``--num-gpus N``; ``--resume`` continues
  from it;
- ``--resume`` drops the ``metrics.json`` records past the iteration it resumes from;
- ``last_eval.json`` is strict JSON (a NaN metric is ``null``);
- ``--num-gpus N`` without CUDA runs N CPU processes (gloo).
"""
import argparse
import difflib
import gc
import json
import logging
import os
import re
import sys

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.multiprocessing import ProcessExitedException
from torch.nn.parallel import DistributedDataParallel

from revcolv2.atomic_io import write_text_atomic
from revcolv2.checkpoint import ShapeMismatchError
from revcolv2.metrics_log import json_compatible, split_json_lines
from revcolv2.model import allow_level_recompiles, compile_for_training
from revcolv2.run_dir import RunLayout, claim_output_dir, refuse_links
from revcolv2.signals import StopSignals, TrainingInterrupted, agree_on_signal, end_launcher, exit_launcher

from .backbone import RevColV2Backbone
from .checkpoint import RevColV2Checkpointer
from .classes import (
    ClassMismatchError,
    check_loaded_classes,
    check_model_fits_dataset,
    check_training_classes,
    dataset_name,
)
from .data import register_all
from .data.custom import CustomDatasetError, register_config_datasets
from .safe_config import load_lazy_config
from .tta import build_tta_model, enabled_test_aug

logger = logging.getLogger("detectron2")

PRECISIONS = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# what a training run leaves in train.output_dir (config.yaml and detectron2's text log are
# rewritten / appended by every run and do not count)
DETECTRON2_RUN = RunLayout(
    is_run_file=lambda n: (n in ("last_checkpoint", "metrics.json", "last_eval.json")
                           or bool(re.match(r"^model_(\d+|final)\.pth$", n)) or n.startswith("events.out.tfevents.")),
    resume="--resume", elsewhere="write to another train.output_dir=DIR", restart="iteration 0",
    deleted="its checkpoints, metrics.json, last_eval.json and TensorBoard events",
    # detectron2 writes these in place (appends, or opens with "w"): a link among them is refused
    in_place=("config.yaml", "metrics.json", "log.txt"))
# what --eval-only writes in place (its last_eval.json is renamed into place)
EVAL_ONLY_IN_PLACE = ("config.yaml", "log.txt")


# --------------------------------------------------------------------------- overrides
class OverrideKeyError(KeyError):
    """A command-line override names a key the config does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


def _config_keys(node, prefix: str = ""):
    """Every dotted key of a LazyConfig (list items by index), depth first."""
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else \
        enumerate(node) if isinstance(node, ListConfig) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        yield key
        if isinstance(v, (DictConfig, ListConfig)):
            yield from _config_keys(v, key + ".")


class OverrideTypeError(ValueError):
    """A command-line override whose value is not of the type the config's value has."""


_NO_DEFAULT = object()


def _call_parameter(cfg, key: str):
    """``(accepted, default)`` for ``key`` as an argument of a LazyCall: accepted when its
    parent has a ``_target_`` whose signature has that parameter, or takes ``**kwargs``
    (then the call itself rejects an unknown name when the config is instantiated); the
    parameter's default, or ``_NO_DEFAULT``."""
    import inspect

    from detectron2.utils.registry import locate

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False, _NO_DEFAULT
    target = node._target_
    try:
        target = locate(target) if isinstance(target, str) else target
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError, ImportError):
        return False, _NO_DEFAULT
    for p in params:
        if p.name == leaf:
            return True, _NO_DEFAULT if p.default is inspect.Parameter.empty else p.default
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params), _NO_DEFAULT


def _call_accepts(cfg, key: str) -> bool:
    return _call_parameter(cfg, key)[0]


def _expected_type(current):
    """(the types an override of a key holding ``current`` may have, their name in words),
    or None when anything goes (no value, ``None``, an object)."""
    if isinstance(current, bool):
        return (bool,), "true or false"
    if isinstance(current, int):
        return (int,), "a whole number"
    if isinstance(current, float):
        return (int, float), "a number"
    if isinstance(current, str):
        return (str, type(None)), "a string"
    if isinstance(current, (ListConfig, list, tuple)):
        return (list, tuple, type(None)), "a list [a, b, ...]"
    if isinstance(current, (DictConfig, dict)):
        return (dict, type(None)), "a mapping {key: value, ...}"
    return None


def check_override_type(key: str, value, current, config_file: str) -> None:
    """:class:`OverrideTypeError` naming the key, the value and the expected type when
    ``value`` (as Hydra parsed it) cannot stand where the config holds ``current``: a string
    for a number (``train.max_iter=abc``), ``1.5`` for a whole number, a number for a list.
    A whole number is a number; ``null`` may replace a string, list or mapping."""
    expected = _expected_type(current)
    if expected is None:
        return
    types, words = expected
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        shown = current if not isinstance(current, (DictConfig, ListConfig)) else OmegaConf.to_container(current)
        raise OverrideTypeError(
            f"config override {key}={value!r}: expected {words} ({type(shown).__name__}), as {config_file} has "
            f"{shown!r} there; nothing was run or written")


def apply_overrides(cfg, overrides, config_file: str = "the config"):
    """detectron2's ``LazyConfig.apply_overrides``, but checked before anything is applied:

    - a key that the config does not have is an error (a typo such as ``trian.max_iter=5``
      would otherwise be ignored) naming the key and the closest existing one. An argument
      of a LazyCall that the config leaves at its default counts as existing. ``+key=value``
      adds a new key on purpose;
    - a value whose type the config's value (or the argument's default) rules out is an
      error naming the key, the value and the expected type (:func:`check_override_type`):
      ``train.max_iter=abc`` would otherwise fail deep in detectron2."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    missing = object()
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.is_add():
            continue
        current = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
        if current is not missing:
            check_override_type(key, o.value(), current, config_file)
            continue
        accepted, default = _call_parameter(cfg, key)
        if accepted:
            if default is not _NO_DEFAULT:
                check_override_type(key, o.value(), default, f"the default of {key.rpartition('.')[0]}")
            continue
        close = difflib.get_close_matches(key, list(_config_keys(cfg)), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise OverrideKeyError(f"config override {key}={o.value()!r}: {config_file} has no key {key!r}{hint} "
                       f"(write +{key}=... to add a new key)")
    return LazyConfig.apply_overrides(cfg, overrides)


# --------------------------------------------------------------------------- signals
class StopOnSignal(hooks.HookBase):
    """SIGTERM / SIGINT: finish the current iteration, write ``model_<iter>.pth`` (with the
    trainer state, so ``--resume`` continues from the next iteration), then exit 128 + signal.

    The project's one stop-signal policy (:mod:`revcolv2.signals`): all processes agree on
    the stop after every iteration (an all-reduce of the signal number), so they stop at the
    same iteration and the checkpoint is consistent; a second signal aborts at once.
    """

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.signals = StopSignals(lambda signum: logger.warning(
            "signal %d: saving a checkpoint after this iteration, then stopping", signum))

    def before_train(self):
        self.signals.install()

    def after_step(self):
        signum = agree_on_signal(self.signals.signum)
        if not signum:
            return
        iteration = self.trainer.iter
        if comm.is_main_process():
            self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        comm.synchronize()
        logger.warning("stopped after iteration %d; continue with --resume", iteration)
        raise TrainingInterrupted(signum, iteration)

    def after_train(self):
        self.signals.restore()
        # end the loader workers here, however training ended: they ignore SIGTERM, so the
        # SIGTERM that multiprocessing sends its daemon children at exit would not end them
        # and the process would wait for them forever
        self.trainer._data_loader_iter_obj = None
        gc.collect()


# --------------------------------------------------------------------------- logs, processes
def trim_metrics(output_dir: str, start_iter: int) -> int:
    """Drop the ``metrics.json`` records of iterations >= ``start_iter`` (a resume repeats
    them), and malformed records with a warning naming the file and their lines
    (:func:`revcolv2.metrics_log.split_json_lines`). Rewritten in place: detectron2's writer may
    already hold the file open for appending. Returns how many records were dropped."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return 0
    lines = split_json_lines(path, "iteration", lambda it: it < start_iter, log=logger.warning)
    if lines.past or lines.malformed:
        with open(path, "r+") as f:
            f.write("".join(line + "\n" for line in lines.included))
            f.truncate()
    return lines.past


def ddp_model(model, device, **ddp_kwargs):
    """detectron2's ``create_ddp_model``, also for CPU processes (gloo): there DDP takes no
    ``device_ids`` and fp16 gradient compression is off."""
    if comm.get_world_size() > 1 and not str(device).startswith("cuda"):
        ddp_kwargs.pop("fp16_compression", None)
        return DistributedDataParallel(model, **ddp_kwargs)
    return create_ddp_model(model, **ddp_kwargs)


def do_test(cfg, model, checkpointer=None):
    """Evaluate on the config's test set (checking that the model, and the checkpoint
    ``checkpointer`` loaded, predict that dataset's classes); with ``test.aug.enabled`` also
    with test-time augmentation, whose results come under ``<task>_TTA``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    loader = instantiate(cfg.dataloader.test)
    name = dataset_name(OmegaConf.select(cfg, "dataloader.test.dataset.names", default=None))
    names = check_model_fits_dataset(model, name, custom="dataset" in cfg)
    if checkpointer is not None:
        check_loaded_classes(checkpointer, names, name)
    ret = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    aug = enabled_test_aug(cfg)
    if aug is not None:
        logger.info("Evaluating with test-time augmentation: scales %s of the test size%s", aug["scales"],
                    ", each also flipped" if aug["flip"] else "")
        tta = inference_on_dataset(build_tta_model(model, aug["scales"], aug["flip"]), loader,
                                   instantiate(cfg.dataloader.evaluator))
        tta = {f"{task}_TTA": res for task, res in tta.items()}
        print_csv_format(tta)
        for line in compare_tta(ret, tta):
            logger.info(line)
        ret = {**ret, **tta}
    if comm.is_main_process() and cfg.train.get("output_dir"):
        write_last_eval(cfg.train.output_dir, ret)
    return ret


def compare_tta(single, tta) -> list:
    """One line per task: its main metric single-scale and with test-time augmentation."""
    lines = []
    for task, res in single.items():
        metric = next((m for m in ("mIoU", "AP") if m in res), None)
        if metric is not None and metric in tta.get(f"{task}_TTA", {}):
            lines.append(f"{task} {metric}: single-scale {res[metric]:.2f}, test-time augmentation "
                         f"{tta[task + '_TTA'][metric]:.2f}")
    return lines


def write_last_eval(output_dir: str, results) -> str:
    """The latest evaluation, machine-readable (also in metrics.json when training), as
    strict JSON: a metric that is NaN (COCO's AP of a class without ground truth, ...) is
    written ``null``, since the ``NaN`` that ``json.dump`` writes is no JSON."""
    path = os.path.join(output_dir, "last_eval.json")
    # renamed into place: a symbolic link there is replaced, never written through
    write_text_atomic(path, json.dumps(json_compatible(results), indent=1, allow_nan=False))
    return path


def _amp_settings(cfg):
    """(enabled, dtype): AMP only on CUDA, with the precision the config asks for."""
    amp = cfg.train.get("amp", {})
    enabled = bool(amp.get("enabled", False))
    precision = str(amp.get("precision", "bf16")).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"train.amp.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if enabled and not str(cfg.train.device).startswith("cuda"):
        logger.info("Mixed precision switched off: train.device=%s is not CUDA", cfg.train.device)
        enabled = False
    return enabled, PRECISIONS[precision]


def compile_if_configured(cfg, model) -> list:
    """``train.compile=True``: :func:`revcolv2.model.compile_for_training` on each RevColV2
    backbone of ``model`` (``compile_levels()`` when reversible, the backbone module whole when
    plain), after raising the recompile limit that ``compile_levels()`` needs (process-wide:
    the program's step). The heads stay eager: proposals, instances and matching have
    data-dependent shapes. Returns the compiled backbones."""
    if not cfg.train.get("compile", False):
        return []
    backbones = [m for m in model.modules() if isinstance(m, RevColV2Backbone)]
    if not backbones:
        raise ValueError("train.compile=True: the model has no RevColV2Backbone to compile")
    allow_level_recompiles()
    for backbone in backbones:
        for line in compile_for_training(backbone):
            logger.info("train.compile: %s", line)
    return backbones
def _unmark_failed_start(output_dir: str, existing: set) -> None:
    """A run that failed before its first iteration ended leaves its folder as it found
    it, as far as "holds a run" goes: detectron2's writers create ``metrics.json`` and a
    TensorBoard events file when they are built, which would make the corrected command
    refused as "already holds a run". The empty ``metrics.json`` and the events files this
    run created are removed (checkpoints never are)."""
    removed = []
    for name in sorted(set(os.listdir(output_dir)) - existing):
        path = os.path.join(output_dir, name)
        if (name == "metrics.json" and os.path.getsize(path) == 0) or name.startswith("events.out.tfevents."):
            os.remove(path)
            removed.append(name)
    if removed:
        logger.warning("the run failed before its first iteration ended: removed what it had created in %s (%s), "
                       "so the folder does not hold a run", output_dir, ", ".join(removed))


# --------------------------------------------------------------------------- resume
def optimizer_settings(optimizer) -> list:
    """The settings of each parameter group (lr, weight decay, ...), without the parameters."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def follow_config_on_resume(optimizer, settings: list, source: str, start_iter: int, max_iter: int) -> None:
    """A resumed run follows its config, not the checkpoint's optimizer settings.

    detectron2 loads the optimizer's parameter groups whole, so the checkpoint's lr (as
    ``initial_lr``, the base that ``lr_multiplier`` multiplies), weight decay and betas would
    win over a changed ``optimizer.lr`` / ``optimizer.weight_decay``: the run would train and
    ignore them. Here the moments stay the checkpoint's and the settings become ``settings``
    (the config's), with each change logged. ``lr_multiplier`` is evaluated at
    ``iteration / train.max_iter`` of this run, so a changed ``train.max_iter`` is followed
    by detectron2 itself; a ``train.max_iter`` below the checkpoint's iteration is refused
    (one line), as the schedule would end before the point the run has reached."""
    if start_iter > max_iter:
        raise SystemExit(f"cannot resume {source}: it is at iteration {start_iter}, past train.max_iter={max_iter}; "
                         f"a schedule cannot end before the point the run has reached. Give train.max_iter >= "
                         f"{start_iter}")
    changes = {}
    for group, own in zip(optimizer.param_groups, settings):
        for key, value in own.items():
            was = group.get("initial_lr", group.get(key)) if key == "lr" else group.get(key)
            if key != "initial_lr" and was != value:
                changes.setdefault(key, set()).add((str(was), str(value)))
        group.update(own)
        group["initial_lr"] = own["lr"]  # the base lr_multiplier multiplies (detectron2 reads it on resume)
    if changes:
        shown = "; ".join(f"{k} {', '.join(f'{a} -> {b}' for a, b in sorted(v)[:3])}"
                          for k, v in sorted(changes.items()))
        logger.warning("resuming %s with a changed optimizer config: %s (per parameter group); the run follows the "
                       "config from iteration %d, the checkpoint's moments are kept", source, shown, start_iter)


def do_train(args, cfg):
    # what the folder held before this run's writers create their files
    existing = set(os.listdir(cfg.train.output_dir)) if os.path.isdir(cfg.train.output_dir) else set()
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    compile_if_configured(cfg, model)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    train_name = dataset_name(OmegaConf.select(cfg, "dataloader.train.dataset.names", default=None))
    # the training data's classes, recorded in checkpoints; the evaluation's must be the same (checked now,
    # not at the first evaluation)
    test_name = dataset_name(OmegaConf.select(cfg, "dataloader.test.dataset.names", default=None))
    classes = check_training_classes(model, train_name, test_name if "evaluator" in cfg.dataloader else None,
                                     custom="dataset" in cfg)

    model = ddp_model(model, cfg.train.device, **cfg.train.ddp)
    amp_enabled, amp_dtype = _amp_settings(cfg)
    if amp_enabled:
        # fp16 needs loss scaling; bf16 has fp32's range and needs none
        grad_scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        trainer = AMPTrainer(model, train_loader, optim, grad_scaler=grad_scaler, precision=amp_dtype)
    else:
        trainer = SimpleTrainer(model, train_loader, optim)
    checkpointer = RevColV2Checkpointer(model, cfg.train.output_dir, ema=not args.no_ema, trainer=trainer,
                                        classes=classes)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            # before the writer: its after_train logs the stopped iteration once (writing it in
            # both after_step and after_train divides by zero in detectron2's ETA estimate)
            StopOnSignal(checkpointer),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )

    settings = optimizer_settings(optim)  # the config's, before a resume loads the checkpoint's
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    resumed = args.resume and checkpointer.has_checkpoint()
    # a run continues only on its own classes; a new run may start its heads from others'
    check_loaded_classes(checkpointer, classes, train_name, refuse=resumed)
    if resumed:
        start_iter = trainer.iter + 1
        follow_config_on_resume(optim, settings, checkpointer._source, start_iter, cfg.train.max_iter)
    else:
        start_iter = 0
    if comm.is_main_process():
        dropped = trim_metrics(cfg.train.output_dir, start_iter)
        if dropped:
            logger.info("metrics.json: dropped %d record(s) of iterations >= %d, which this run repeats",
                        dropped, start_iter)
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except TrainingInterrupted:
        # every process has ended its hooks (the main one writes its logs) before any exits:
        # the launcher of --num-gpus N ends the others as soon as the first is gone
        comm.synchronize()
        raise
    except BaseException:
        if comm.is_main_process() and trainer.iter <= start_iter:
            _unmark_failed_start(cfg.train.output_dir, existing)
        raise


def main(args):
    register_all()
    cfg = load_lazy_config(args.config_file)  # YAML: plain data only (detectron2 would unsafe_load it)
    cfg = apply_overrides(cfg, args.opts, args.config_file)
    try:
        register_config_datasets(cfg)  # the config's own data (configs/custom/), from its dataset.* paths
    except (CustomDatasetError, FileNotFoundError) as e:
        raise SystemExit(f"{args.config_file}: {e}") from None
    if str(cfg.train.get("device", "cuda")).startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    if args.eval_only and cfg.train.get("output_dir") and comm.is_main_process():
        refuse_links(cfg.train.output_dir, EVAL_ONLY_IN_PLACE, "train.output_dir")  # training: in the launcher
    default_setup(cfg, args)

    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = ddp_model(model, cfg.train.device)
        # train.init_checkpoint, or with --resume the last checkpoint in train.output_dir
        checkpointer = RevColV2Checkpointer(model, cfg.train.output_dir, ema=not args.no_ema)
        try:
            checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
            return do_test(cfg, model, checkpointer)
        except ShapeMismatchError as e:
            raise SystemExit(_eval_config_hint(e, args.config_file)) from None
        except (ClassMismatchError, CustomDatasetError) as e:
            raise SystemExit(str(e)) from None
    try:
        do_train(args, cfg)
    except (ClassMismatchError, CustomDatasetError) as e:
        raise SystemExit(str(e)) from None


def _eval_config_hint(error: ShapeMismatchError, config_file: str) -> str:
    """``--eval-only``: a checkpoint of another model size was most likely trained with
    overrides; its run saved the resolved config beside it. (A RevColV2 training checkpoint
    names the exact overrides itself, from the recipe saved in it.)"""
    if getattr(error, "from_recipe", False):
        return str(error)
    saved = os.path.join(os.path.dirname(os.path.abspath(error.source)), "config.yaml")
    if os.path.isfile(saved) and os.path.abspath(saved) != os.path.abspath(config_file):
        how = f"evaluate with the config its run saved: --config-file {saved}"
    else:
        how = "evaluate with the config (and the overrides) it was trained with"
    return f"{error}. Was it trained with overrides? Then {how}"


# --------------------------------------------------------------------------- command line
DESCRIPTION = """\
Train or evaluate a RevColV2 detectron2 LazyConfig: COCO instance segmentation (Mask R-CNN,
Cascade Mask R-CNN) and ADE20K semantic segmentation (UperNet, Mask2Former), or their tiny
demo versions, which train on the CPU in minutes on datasets the project generates itself.
"""

EPILOG = """\
configs (projects/RevColV2/configs/; a .py config is code: run only those you trust):
  demo/mask_rcnn_revcolv2_tiny_shapes.py          the demo that `make demo` trains, evaluates and draws
  demo/upernet_revcolv2_tiny_synthetic.py         UperNet on the built-in ADE20K-style scenes, CPU
  demo/mask2former_revcolv2_tiny_synthetic.py     Mask2Former on the same scenes, CPU
  COCO/mask_rcnn_revcolv2_{b,l}_50ep.py, COCO/cascade_mask_rcnn_revcolv2_{b,l}_100ep.py
  ADE20K/upernet_revcolv2_{b,l}_160k.py, ADE20K/mask2former_revcolv2_{b,l}_160k.py
  custom/mask_rcnn_revcolv2_b_coco_format.py     your COCO-format data: dataset.train_json=FILE dataset.train_images=DIR
                                                 dataset.val_json=FILE dataset.val_images=DIR (docs/DETECTION.md)
  custom/upernet_revcolv2_b_sem_seg_folders.py   your images + label PNGs: dataset.train_images=DIR
                                                 dataset.train_labels=DIR dataset.val_images=DIR dataset.val_labels=DIR
                                                 dataset.classes=FILE (docs/SEGMENTATION.md)
  The demo configs use the revcolv2_tiny preset, the size that
  `tools/pretrain.py --config configs/pretrain/revcolv2_tiny_demo.yaml` pre-trains.
  Datasets are found in $DETECTRON2_DATASETS (default ./datasets): coco/,
  ADEChallengeData2016/, and the built-in ones, generated there on first use.

examples:
  python tools/lazyconfig_train_net.py --config-file projects/RevColV2/configs/demo/mask_rcnn_revcolv2_tiny_shapes.py
  # from the pre-training demo's checkpoint (RevColV2 MIM or classification checkpoints load as they are)
  python tools/lazyconfig_train_net.py --config-file projects/RevColV2/configs/demo/mask_rcnn_revcolv2_tiny_shapes.py \\
      train.init_checkpoint=output/pretrain/revcolv2_tiny_demo/checkpoint-0008.pth
  python tools/lazyconfig_train_net.py --num-gpus 8 --config-file CFG train.init_checkpoint=MIM.pth
  python tools/lazyconfig_train_net.py --config-file CFG --resume
  python tools/lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=output/model_final.pth
  # also multi-scale + flip (test-time augmentation): both results are reported
  python tools/lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=M.pth test.aug.enabled=True

the output folder (train.output_dir):
  A folder that holds a run is not trained into again by accident: --resume continues it
  from its last checkpoint (a SIGTERM or Ctrl-C saves one first), --overwrite starts it
  again from iteration 0, or pick another train.output_dir=DIR. What a run writes there and
  which files are trusted: docs/OPERATIONS.md.
"""


def argument_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/lazyconfig_train_net.py``: detectron2's options, under
    their names and defaults (``default_setup`` and ``launch`` read them), with help that
    describes this project's configs, plus ``--no-ema`` and ``--overwrite``."""
    p = argparse.ArgumentParser(prog="tools/lazyconfig_train_net.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE",
                   help="a LazyConfig (.py) from projects/RevColV2/configs/, or a config.yaml that a run saved")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.output_dir from its last checkpoint (with --eval-only: "
                        "evaluate that checkpoint)")
    p.add_argument("--eval-only", action="store_true",
                   help="only evaluate train.init_checkpoint on the test set (writes last_eval.json)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine: one per GPU; without CUDA, CPU processes (gloo)")
    p.add_argument("--num-machines", type=int, default=1, help="machines in the job")
    p.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 .. num-machines - 1")
    p.add_argument("--dist-url", default=default_argument_parser().get_default("dist_url"),
                   help="torch.distributed init URL (default: a port derived from your user id)")
    p.add_argument("--no-ema", action="store_true",
                   help="from a checkpoint with EMA weights (model_ema), take the raw ones ('model')")
    p.add_argument("--overwrite", action="store_true",
                   help="train from iteration 0 in a train.output_dir that holds a run, deleting its "
                   "checkpoints, metrics.json, last_eval.json and TensorBoard events")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                   help="config overrides key=value, e.g. train.max_iter=100 train.init_checkpoint=MIM.pth; "
                        "a key the config lacks is an error naming the closest one (+key=value adds a key)")
    return p


def invoke_main(argv=None) -> None:
    args = argument_parser().parse_args(argv)
    if torch.cuda.is_available() and args.num_gpus > torch.cuda.device_count():
        raise SystemExit(f"--num-gpus {args.num_gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if not torch.cuda.is_available() and args.num_gpus > 1:
        print(f"no CUDA: --num-gpus {args.num_gpus} runs {args.num_gpus} CPU processes (gloo)", flush=True)
    output_dir = _training_output_dir(args)
    if not output_dir:
        return launch_and_wait(args)
    # the first machine holds the folder (the others may share it over a network file system)
    with claim_output_dir(output_dir, args.resume, args.overwrite, layout=DETECTRON2_RUN, option="train.output_dir"):
        launch_and_wait(args)


def _training_output_dir(args) -> str:
    """``train.output_dir`` of a training run on the first machine ("" otherwise): the
    folder to check and lock before any process starts. The config and its overrides are
    checked here, before anything is written: a bad override is one line."""
    register_all()
    try:
        cfg = apply_overrides(load_lazy_config(args.config_file), args.opts, args.config_file)
    except (OverrideKeyError, OverrideTypeError) as e:
        raise SystemExit(str(e)) from None
    if args.eval_only or args.machine_rank != 0:
        return ""
    return str(cfg.train.get("output_dir", "") or "")


def launch_and_wait(args) -> None:
    """detectron2's ``launch`` of :func:`main`.

    With several processes, this launcher process outlives a SIGINT / SIGTERM sent to the
    process group (by a scheduler, or Ctrl-C): the training processes get it too, agree on
    the iteration, save one checkpoint and exit 128 + signal; the launcher then exits with
    that status and one line. (By default it would die of the signal at once, and take its
    processes with it through their parent-death signal, before they saved.) A second
    signal aborts, as it does in the training processes.
    """
    kwargs = dict(num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url,
                  args=(args,))
    if args.num_gpus * args.num_machines == 1:
        return launch(main, args.num_gpus, **kwargs)
    # the first signal is the training processes' to handle (it reaches them through the
    # process group): the launcher notes it and waits for them
    with StopSignals(lambda signum: print(f"signal {signum}: the {args.num_gpus} training processes save a "
                                          "checkpoint, then stop", file=sys.stderr, flush=True)):
        try:
            launch(main, args.num_gpus, **kwargs)
        except ProcessExitedException as e:  # the status of the first process to end
            exit_launcher("lazyconfig_train_net", e.exit_code,
                          " with a checkpoint in train.output_dir; continue with --resume",
                          f"training process {e.error_index}")
        except KeyboardInterrupt:
            end_launcher("lazyconfig_train_net", 130, "a second signal: aborted without saving")

