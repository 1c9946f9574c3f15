"""Shared training machinery for pre-training, fine-tuning and linear probing.

The three entry points in ``tools/`` subclass :class:`Trainer`, which owns what they have
in common: distributed setup, the step loop with gradient accumulation and bf16 autocast,
the per-step cosine schedule, the progress bar and TensorBoard scalars, and checkpoints
that resume a run *exactly* (model, optimizer, scaler, schedule position, every rank's RNG
state, mid-epoch position). Everything else (model, loss, end-of-epoch evaluation) lives in
the entry points.

Configs are YAML files; a file may name others under ``_base_`` (paths relative to itself)
whose values it overrides.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import random
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import (  # noqa: F401  (LAST_CHECKPOINT_FILE: kept importable from here)
    LAST_CHECKPOINT_FILE, CheckpointError, load_file, newest_readable_checkpoint, read_last_checkpoint,
    remove_stale_temporaries, save_atomic, write_last_checkpoint,
)
from .data import EpochSampler, SeededSamples, resolve_data_path, shard_indices
from .layer_decay import lr_scale

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- configs
def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(path: str, overrides: Sequence[str] = ()) -> dict:
    """Read a YAML config, resolving ``_base_`` files, then apply ``key.sub=value`` overrides."""
    path = Path(path)
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    bases = cfg.pop("_base_", [])
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, load_config(path.parent / b))
    cfg = _merge(merged, cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if leaf not in node:
            raise KeyError(f"override {key!r} names no existing config entry")
        node[leaf] = _parse_value(value)
    return cfg


def _parse_value(text: str):
    """YAML scalar, plus the numbers YAML 1.1 leaves as strings (``8e-3``, ``1e5``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# --------------------------------------------------------------------------- validation
_MISSING = object()


def config_value(cfg: dict, key: str, kind: str = "positive_int"):
    """``cfg[a][b]`` for ``key = "a.b"``, checked; errors name the key.

    ``kind``: ``positive_int`` (an integer >= 1; ``2.0`` is taken as 2, ``1.5`` refused),
    ``nonneg_int``, ``positive_float`` or ``nonneg_float`` (any real number; booleans and
    strings are refused).
    """
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            raise KeyError(f"config key {key!r} is missing")
    return check_number(node, key, kind)


def check_number(value, key: str, kind: str = "positive_int"):
    """``value`` as an int / float of the given ``kind`` (see :func:`config_value`)."""
    want_int = kind.endswith("_int")
    positive = kind.startswith("positive")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a{' whole' if want_int else ''} number, got {value!r}")
    if want_int:
        if value != int(value):
            raise ValueError(f"{key} must be a whole number, got {value!r}")
        value = int(value)
    if positive and value <= 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{key} must be >= 0, got {value!r}")
    return value


def validate_config(cfg: dict, spec: Dict[str, str]) -> dict:
    """Check the numbers ``spec`` names (``{"optim.batch_size": "positive_int", ...}``) and
    store them back normalised (``2.0`` epochs -> 2); the first bad one is a ``ValueError``
    naming its key. Returns ``cfg``."""
    for key, kind in spec.items():
        value = config_value(cfg, key, kind)
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def positive_int(text: str) -> int:
    """argparse ``type`` for an integer >= 1 (``--batch-per-gpu 0`` is an error, not 'default')."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """argparse ``type`` for an integer >= 0."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


# --------------------------------------------------------------------------- output folders
_EPOCH_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pth$")
_RESUME_POINT = re.compile(r"^checkpoint-(\d+|last)\.pth$")
LOG_FILE = "log.jsonl"


class RunExistsError(SystemExit):
    """The output folder already holds a run; the message says how to continue or replace it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_files(output_dir: str) -> List[str]:
    """The files in ``output_dir`` that make it hold a training run (resume points, the
    pointer, the metrics log), sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if _RESUME_POINT.match(n) or n in (LAST_CHECKPOINT_FILE, LOG_FILE))


def check_output_dir(output_dir: str, resume: Optional[str], overwrite: bool, info: "DistInfo") -> None:
    """Refuse to start a new run over an existing one.

    Without ``--resume`` a folder holding a run is an error that offers ``--resume auto``,
    a new ``--output-dir`` or ``--overwrite``. With ``--overwrite`` the old run's resume
    points, pointer and log are removed (``checkpoint-best.pth`` is kept: the new run
    replaces it only with a better model). Called before anything is written.
    """
    if resume:
        return
    found = run_files(output_dir)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RunExistsError(
            f"{output_dir} already holds a run ({shown}). Continue it with --resume auto, "
            f"write to a new --output-dir, or pass --overwrite to start again from step 0 "
            f"(its checkpoints and log will be deleted)."
        )
    barrier(info)  # every rank has looked before the main process deletes
    if info.is_main:
        for name in found:
            os.remove(os.path.join(output_dir, name))
        print(f"--overwrite: removed {len(found)} file(s) of the previous run in {output_dir}: {', '.join(found)}")
    barrier(info)


def prune_checkpoints(output_dir: str, keep_last: int, keep_every: int) -> List[str]:
    """Delete ``checkpoint-NNNN.pth`` files except the ``keep_last`` highest epochs and every
    epoch divisible by ``keep_every`` (0: none). ``keep_last <= 0`` keeps everything.
    Returns the deleted names."""
    if keep_last <= 0 or not os.path.isdir(output_dir):
        return []
    epochs = sorted(int(m.group(1)) for m in map(_EPOCH_CHECKPOINT.match, os.listdir(output_dir)) if m)
    keep = set(epochs[-keep_last:]) | {e for e in epochs if keep_every > 0 and e % keep_every == 0}
    deleted = []
    for e in epochs:
        if e not in keep:
            name = f"checkpoint-{e:04d}.pth"
            try:
                os.remove(os.path.join(output_dir, name))
            except FileNotFoundError:
                continue
            deleted.append(name)
    return deleted


def trim_log(path: str, step: int) -> int:
    """Drop the records of a JSON-lines log whose ``step`` is past ``step`` (they belong to
    training that a resume repeats). Returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill: drop it
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def read_best(output_dir: str, key: str = "top1") -> Optional[Dict[str, Any]]:
    """``{"top1", "epoch"}`` of an existing ``checkpoint-best.pth`` (read memory-mapped), or
    None when there is none or it cannot be read."""
    path = os.path.join(output_dir, "checkpoint-best.pth")
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        value = float(ckpt["best"][key]) if "best" in ckpt else float(max(
            ckpt["metrics"].get(key, -1.0), ckpt["metrics"].get("ema_" + key, -1.0)))
        return {key: value, "epoch": int(ckpt.get("epoch", 0))}
    except Exception as e:  # noqa: BLE001 - any unreadable file: warn, do not crash the run
        print(f"warning: cannot read the score of {path} ({type(e).__name__}: {e}); "
              "a new best model will replace it")
        return None


# --------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Set up torch.distributed from torchrun's environment (single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def prepare_data_root(data_path: Optional[str], info: DistInfo) -> Path:
    """``--data-path``, or the built-in dataset: the main process generates it once while
    the others wait, then every process resolves the same folder."""
    if info.is_main:
        resolve_data_path(data_path)
    barrier(info)
    return resolve_data_path(data_path)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and lists only (a checkpoint loads with
    ``weights_only=True``); :func:`set_rng_state` restores them exactly."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state` (also the tuple / ndarray form of older checkpoints)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    if isinstance(npst, dict):
        keys = np.asarray(npst["keys"].numpy() if torch.is_tensor(npst["keys"]) else npst["keys"]).astype(np.uint32)
        npst = (npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    np.random.set_state(npst)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(info: DistInfo) -> List[Dict[str, Any]]:
    """Every rank's RNG state, in rank order (on every rank)."""
    mine = rng_state()
    if not info.enabled:
        return [mine]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return out


# --------------------------------------------------------------------------- optimizer
def no_weight_decay(name: str, param: torch.Tensor, skip: Iterable[str]) -> bool:
    """Norm weights, biases and the names in ``skip`` (alphas, mask token) are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or name in set(skip)


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float,
                             skip: Iterable[str] = ()) -> List[dict]:
    """Parameter groups keyed by (layer id, decay / no decay) under the one shared rule.

    Each group carries ``lr_scale = layer_decay ** (max_id + 1 - id)``
    (``revcolv2.layer_decay.lr_scale``), which timm's schedulers multiply into the lr.
    Frozen parameters are left out.
    """
    skip = set(skip)
    groups: Dict[tuple, dict] = {}
    cfg = (model.num_levels, model.blocks_per_level, model.num_bu_columns, model.num_td_columns)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = model.layer_id(name)
        decay = not no_weight_decay(name, p, skip)
        key = (lid, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "param_names": [], "layer_id": lid,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": lr_scale(name, layer_decay, *cfg),
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
    """Linear warm-up then half-cosine, updated every optimizer step (timm's CosineLRScheduler)."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr, warmup_t=warmup_steps,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )


# --------------------------------------------------------------------------- logging
class TensorBoard:
    """SummaryWriter on the main process, a no-op elsewhere (or when TensorBoard is missing)."""

    def __init__(self, folder: Optional[str], enabled: bool):
        self.writer = None
        if enabled and folder:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover
                return
            self.writer = SummaryWriter(folder)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, img, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------- signals
def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT / SIGTERM.

    A scheduler (SLURM, Kubernetes) or Ctrl-C in a terminal signals the whole process
    group; workers that die first make the main process crash before it can write its
    checkpoint. The main process alone decides to stop; its workers end with it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainingInterrupted(SystemExit):
    """Raised after the checkpoint of a run stopped by a signal: exit status 128 + signal
    (130 for SIGINT, 143 for SIGTERM), so ``pretrain && finetune`` does not go on."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Epoch / step loop shared by the entry points.

    Subclasses implement :meth:`forward_loss` (a micro-batch -> scalar loss) and may
    override :meth:`after_step`, :meth:`end_of_epoch`, :meth:`extra_state` and
    :meth:`load_extra_state`.

    One *step* is one optimizer update over ``accum`` micro-batches of ``micro_batch``
    images on each of ``world_size`` processes.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
                 info: DistInfo, output_dir: str, effective_batch: int, micro_batch: int,
                 epochs: int, warmup_epochs: float, min_lr: float = 0.0, amp: str = "bf16",
                 num_workers: int = 4, seed: int = 0, save_every: int = 1, log_every: int = 10,
                 clip_grad: Optional[float] = None, find_unused_parameters: bool = False,
                 config: Optional[dict] = None, name: str = "train", keep_last: int = 0, keep_every: int = 0):
        self.model = model
        self.optimizer = optimizer
        self.info = info
        self.output_dir = output_dir
        self.epochs = epochs
        self.seed = seed
        self.save_every = max(1, int(save_every))
        self.keep_last, self.keep_every = int(keep_last), int(keep_every)  # checkpoint retention
        self.log_every = max(1, int(log_every))
        self.clip_grad = clip_grad
        self.config = config or {}
        self.name = name

        micro_batch = min(micro_batch, max(1, effective_batch // info.world_size))
        per_update = micro_batch * info.world_size
        if effective_batch % per_update:
            raise ValueError(
                f"effective batch {effective_batch} is not a multiple of {info.world_size} process(es) "
                f"x micro-batch {micro_batch}; pick a micro-batch that divides it"
            )
        self.micro_batch = micro_batch
        self.accum = effective_batch // per_update
        self.effective_batch = effective_batch

        self.sampler = EpochSampler(len(dataset), micro_batch * self.accum, info.rank, info.world_size,
                                    shuffle=True, seed=seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = self.steps_per_epoch * epochs
        self.loader = DataLoader(
            SeededSamples(dataset, seed), batch_size=micro_batch, sampler=self.sampler,
            num_workers=num_workers, pin_memory=info.device.type == "cuda",
            persistent_workers=num_workers > 0, drop_last=False, worker_init_fn=ignore_stop_signals,
            # its own generator: creating an iterator must not draw from the global RNG,
            # or a run resumed mid-epoch would diverge from an uninterrupted one
            generator=torch.Generator().manual_seed(seed),
        )
        self.scheduler = build_scheduler(optimizer, self.total_steps,
                                         int(round(warmup_epochs * self.steps_per_epoch)), min_lr)

        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.use_amp = info.device.type == "cuda" and self.amp_dtype is not None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

        self.ddp_model = model
        if info.enabled and any(p.requires_grad for p in model.parameters()):
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )

        self.epoch = 0          # epoch in progress
        self.step = 0           # optimizer updates done
        self.step_in_epoch = 0  # updates done in the epoch in progress
        self.history: Dict[int, float] = {}  # step -> training loss of that update (this rank)
        self._epoch_losses: List[float] = []
        self._stop_requested = 0  # the signal number once one arrived
        if info.is_main:  # temporary files of a killed checkpoint write
            remove_stale_temporaries(output_dir)
        self.tb = TensorBoard(os.path.join(output_dir, "tb"), info.is_main)

    # ----------------------------------------------------------------- to override
    def forward_loss(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer update (EMA updates go here)."""

    def end_of_epoch(self, epoch: int) -> Dict[str, float]:
        """Called after each completed epoch; returns metrics to log."""
        return {}

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        pass

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "epoch_losses": list(self._epoch_losses),  # so a resumed epoch logs its true mean
            "steps_per_epoch": self.steps_per_epoch,
            "effective_batch": self.effective_batch,
            "world_size": self.info.world_size,
            "rng": gather_rng_states(self.info),
            "config": self.config,
        }
        state.update(self.extra_state())
        return state

    def save(self, filename: str, resume_point: bool = True) -> Optional[str]:
        """Write a checkpoint atomically (main process); note it as the latest resume point."""
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        path = os.path.join(self.output_dir, filename)
        if self.info.is_main:
            save_atomic(state, path)
            if resume_point:
                write_last_checkpoint(self.output_dir, filename)
        barrier(self.info)
        return path

    def resume(self, path: str) -> None:
        ckpt = load_file(path)  # weights_only: nothing in the file can run code
        needed = ("model", "optimizer", "scaler", "scheduler", "epoch", "step", "step_in_epoch", "rng")
        lacking = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
        if lacking:
            raise CheckpointError(
                f"{path} is not a resumable training checkpoint (it lacks {', '.join(lacking)}); "
                "to start from its weights, pass it as the initial checkpoint instead (--finetune)"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["steps_per_epoch"] != self.steps_per_epoch or ckpt["effective_batch"] != self.effective_batch:
            raise ValueError(
                f"{path} was written with {ckpt['steps_per_epoch']} steps per epoch and batch "
                f"{ckpt['effective_batch']}; this run has {self.steps_per_epoch} and {self.effective_batch}. "
                "Resuming needs the same data and effective batch size."
            )
        self.epoch, self.step, self.step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        self._epoch_losses = list(ckpt.get("epoch_losses", []))
        rngs = ckpt["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            seed_everything(self.seed + self.info.rank + 7919 * self.step)
            if self.info.is_main:
                print(f"warning: {path} was written by {len(rngs)} process(es), this run has "
                      f"{self.info.world_size}; RNG streams are reseeded, so the run continues "
                      "correctly but not bit-identically")
        self.load_extra_state(ckpt)
        if self.info.is_main:
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step} "
                  f"({self.step_in_epoch}/{self.steps_per_epoch} of the epoch)")

    # ----------------------------------------------------------------- loop
    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self._stop_requested = int(signum)
        if self.info.is_main:
            print(f"\nsignal {signum}: saving a checkpoint after this step, then stopping "
                  "(press Ctrl-C again to abort without saving)")

    def _should_stop(self, stop_at_step: Optional[int]) -> bool:
        """Whether to stop after this step. Every rank must stop at the same step: the ranks
        agree by an all-reduce (MAX) of the signal number, so a signal seen by one rank
        stops all of them, and every rank then knows which signal it was."""
        signum = self._stop_requested
        if self.info.enabled:
            flag = torch.tensor([float(signum)], device=self.info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        self._stop_signal = signum
        return bool(signum) or (stop_at_step is not None and self.step >= stop_at_step)

    def _stopped(self, where: str) -> Dict[int, float]:
        """After the stop checkpoint: raise :class:`TrainingInterrupted` for a signal."""
        if self.info.is_main:
            print(f"stopped {where}; resume with --resume auto")
        if self._stop_signal:
            raise TrainingInterrupted(self._stop_signal, self.step)
        return self.history

    def autocast(self):
        if not self.use_amp:
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def train_step(self, micro_batches) -> float:
        self.ddp_model.train()
        self.scheduler.step_update(self.step)  # lr of this update
        total = 0.0
        for a, batch in enumerate(micro_batches):
            sync = a == self.accum - 1 or not isinstance(self.ddp_model, nn.parallel.DistributedDataParallel)
            with (nullcontext() if sync else self.ddp_model.no_sync()):
                with self.autocast():
                    loss = self.forward_loss(batch)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; stopping")
                self.scaler.scale(loss / self.accum).backward()
            total += loss.item()
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.step_in_epoch += 1
        self.after_step()
        return total / self.accum

    def current_lr(self) -> float:
        """lr of the group with the largest scale (the head's under layer decay)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def fit(self, stop_at_step: Optional[int] = None) -> Dict[int, float]:
        """Train until the last epoch (or ``stop_at_step`` / a SIGINT-SIGTERM, after which a
        resumable ``checkpoint-last.pth`` is written). Returns {step: loss} of this run."""
        import threading

        from tqdm import tqdm

        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._request_stop)
        if self.info.is_main:
            print(f"{self.name}: {self.epochs} epochs x {self.steps_per_epoch} steps, effective batch "
                  f"{self.effective_batch} = {self.info.world_size} process(es) x {self.micro_batch} x "
                  f"{self.accum} accumulation, device {self.info.device}, "
                  f"amp {self.amp_dtype if self.use_amp else 'off'}")
        start_time, start_step = time.time(), self.step
        self._stop_signal = 0
        if self.info.is_main:
            # records past the resume point would be written again: drop them
            dropped = trim_log(os.path.join(self.output_dir, LOG_FILE), self.step)
            if dropped:
                print(f"{LOG_FILE}: dropped {dropped} record(s) past step {self.step}, which this run repeats")
        try:
            while self.epoch < self.epochs:
                epoch = self.epoch
                self.sampler.set_epoch(epoch, start=self.step_in_epoch * self.micro_batch * self.accum)
                batches = iter(self.loader)
                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                           desc=f"{self.name} epoch {epoch + 1}/{self.epochs}", disable=not self.info.is_main,
                           dynamic_ncols=True, mininterval=1.0, leave=True)
                while self.step_in_epoch < self.steps_per_epoch:
                    loss = self.train_step([next(batches) for _ in range(self.accum)])
                    self.history[self.step] = loss
                    self._epoch_losses.append(loss)
                    done = self.step - start_step
                    eta = (time.time() - start_time) / done * (self.total_steps - self.step)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.current_lr():.2e}", eta=format_seconds(eta),
                                    refresh=False)
                    bar.update(1)
                    if self.step % self.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                        mean_loss = all_reduce_sum(torch.tensor([loss], device=self.info.device), self.info)
                        mean_loss = mean_loss.item() / self.info.world_size
                        self.tb.scalars({f"{self.name}/loss": mean_loss, f"{self.name}/lr": self.current_lr()},
                                        self.step)
                    if self.step_in_epoch < self.steps_per_epoch and self._should_stop(stop_at_step):
                        bar.close()
                        self.save("checkpoint-last.pth")
                        return self._stopped(f"at step {self.step}")
                bar.close()
                del batches
                self.epoch, self.step_in_epoch = epoch + 1, 0
                metrics = self.end_of_epoch(epoch)
                metrics = dict(metrics, epoch=epoch + 1, step=self.step,
                               train_loss=float(np.mean(self._epoch_losses)) if self._epoch_losses else float("nan"))
                self._epoch_losses = []
                self.tb.scalars({f"epoch/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")},
                                self.epoch)
                if self.info.is_main:
                    with open(os.path.join(self.output_dir, LOG_FILE), "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                saved = self.save_epoch_checkpoint(epoch + 1)
                if self.epoch < self.epochs and self._should_stop(stop_at_step):
                    if not saved:
                        self.save("checkpoint-last.pth")
                    return self._stopped(f"after epoch {self.epoch}")
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.tb.close()
            # end the loader workers however training ended: they ignore SIGTERM, so the
            # SIGTERM that multiprocessing sends its daemon children at exit would not end
            # them, and the process would wait for them forever
            batches = None  # noqa: F841
            self.loader._iterator = None
            gc.collect()
        if self.info.is_main:
            print(f"{self.name} finished: {self.step - start_step} steps in {format_seconds(time.time() - start_time)}")
        return self.history

    def save_epoch_checkpoint(self, epochs_done: int) -> bool:
        """Default: ``checkpoint-XXXX.pth`` every ``save_every`` epochs and at the end.
        Returns whether a resumable checkpoint was written."""
        if epochs_done % self.save_every == 0 or epochs_done == self.epochs:
            self.save(f"checkpoint-{epochs_done:04d}.pth")
            if self.info.is_main:
                deleted = prune_checkpoints(self.output_dir, self.keep_last, self.keep_every)
                if deleted:
                    print(f"retention (keep last {self.keep_last}, every {self.keep_every}-th epoch): "
                          f"deleted {', '.join(deleted)}")
            return True
        return False


def find_resume_checkpoint(resume: Optional[str], output_dir: str, verbose: bool = True) -> Optional[str]:
    """``--resume``: a path, ``auto`` (the newest readable checkpoint in ``output_dir``) or None.

    ``auto`` reads the ``step`` of the checkpoint the ``last_checkpoint`` pointer names and of
    every ``checkpoint-*.pth`` beside it, and takes the highest (the pointer's on a tie). An
    unreadable file (truncated, corrupt, not a checkpoint) is skipped with a warning naming
    it, so a write cut short falls back to the previous good checkpoint. A pointer naming a
    file outside ``output_dir`` is an error. Returns None (and says so) when nothing is there.
    """
    if not resume:
        return None
    if resume != "auto":
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such file")
        return resume
    pointed = read_last_checkpoint(output_dir)
    names = sorted(os.path.join(output_dir, n) for n in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
                   if n.startswith("checkpoint-") and n.endswith(".pth"))
    found = newest_readable_checkpoint(([pointed] if pointed else []) + [p for p in names if p != pointed],
                                       "step", pointed, required=("optimizer",), log=print if verbose else None)
    if found is None:
        if verbose:
            print(f"--resume auto: no resumable checkpoint in {output_dir}; starting from scratch")
        return None
    return found[0]


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(forward, dataset: Dataset, info: DistInfo, batch_size: int, num_workers: int = 4,
             autocast=nullcontext) -> Dict[str, float]:
    """Top-1 / top-5 (%) and cross-entropy of ``forward(images) -> logits`` over ``dataset``.

    Each process evaluates a disjoint shard and the counts are summed, so every image
    counts exactly once whatever the number of processes.
    """
    from torch.utils.data import Subset

    subset = Subset(dataset, shard_indices(len(dataset), info.rank, info.world_size))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=info.device.type == "cuda", generator=torch.Generator(),
                        worker_init_fn=ignore_stop_signals)
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # n, top1, top5, loss
    for images, target in loader:
        images = images.to(info.device, non_blocking=True)
        target = target.to(info.device, non_blocking=True)
        with autocast():
            logits = forward(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        correct = topk.eq(target[:, None])
        sums += torch.stack([
            torch.tensor(float(len(target)), device=info.device, dtype=torch.float64),
            correct[:, :1].sum().double(),
            correct.sum().double(),
            nn.functional.cross_entropy(logits, target, reduction="sum").double(),
        ])
    sums = all_reduce_sum(sums, info)
    n = max(sums[0].item(), 1.0)
    return {"top1": 100.0 * sums[1].item() / n, "top5": 100.0 * sums[2].item() / n, "loss": sums[3].item() / n}


def num_workers_default() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def write_config(cfg: dict, output_dir: str, info: DistInfo) -> None:
    if info.is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
