"""The training loop shared by pre-training, fine-tuning and linear probing.

The three entry points (``revcolv2.cli``) subclass :class:`Trainer`, which owns what they have
in common: distributed setup, the step loop with gradient accumulation and bf16 autocast,
the per-step cosine schedule, the progress bar and TensorBoard scalars, and checkpoints
that resume a run *exactly* (model, optimizer, scaler, schedule position, every rank's RNG
state, mid-epoch position). Everything else (model, loss, end-of-epoch evaluation) lives in
the entry points.

Configs, distributed set-up, RNG states, optimizer groups, checkpoint files, the metrics log
and the stop-signal policy live in ``config``, ``distributed``, ``rng``, ``optim``,
``atomic_io`` / ``run_checkpoints``, ``metrics_log`` and ``signals``.
"""
from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import time
from collections import deque
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .amp import amp_dtype, autocast
from .atomic_io import open_append, remove_stale_temporaries, save_atomic
from .checkpoint import CheckpointError, ShapeMismatchError, check_shapes, load_file
from .data import EpochSampler, SeededSamples
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier
from .metrics_log import LOG_FILE, json_line, trim_log
from .optim import build_scheduler
from .rng import gather_rng_states, seed_everything, set_rng_state
from .run_checkpoints import prune_checkpoints, write_last_checkpoint
from .signals import StopSignals, TrainingInterrupted, agree_on_signal, ignore_stop_signals


class ResumeError(SystemExit):
    """A checkpoint that this run cannot continue as configured (another batch, a schedule
    that ends before its step, another model). A ``SystemExit``: the tools stop with this
    one-line message (status 1), which names the file and what differs, instead of a
    traceback."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def config_changes(old: Any, new: Any, prefix: str = "") -> List[str]:
    """``key old -> new`` for every value that differs between two recipes (nested dicts,
    dotted keys; a key only one of them has shows as missing). Empty when ``old`` is not a
    dict (a checkpoint that saved no config)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, "(missing)"), new.get(key, "(missing)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a} -> {b}")
    return out


def _model_hint(changed: List[str]) -> str:
    """The model keys of the recipe that changed since the checkpoint, as a hint."""
    model = [c for c in changed if c.startswith("model.")]
    return f" (its recipe differs in {'; '.join(model)})" if model else ""


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


class _Clock:
    """Wall time since a run (or its resumed part) started, and the ETA it implies."""

    def __init__(self, start_step: int):
        self.start_time, self.start_step = time.time(), start_step

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def eta(self, step: int, total_steps: int) -> float:
        done = step - self.start_step
        return self.elapsed() / done * (total_steps - step) if done > 0 else 0.0


class Trainer:
    """Epoch / step loop shared by the entry points.

    Subclasses implement :meth:`forward_loss` (a micro-batch -> scalar loss) and may
    override :meth:`after_step`, :meth:`end_of_epoch`, :meth:`extra_state` and
    :meth:`load_extra_state`.

    One *step* is one optimizer update over ``accum`` micro-batches of ``micro_batch``
    images on each of ``world_size`` processes.

    Its *data time* is how long the step waited for its micro-batches (detectron2's
    ``data_time``): about zero when the loader keeps up, the step's input-bound share when
    it does not. The progress bar shows ``data=`` (this process, median of the last
    ``DATA_WINDOW`` steps); TensorBoard gets ``<name>/data_time`` every ``log_every`` steps
    (the mean over those steps, of the slowest process: it holds the others back).
    """

    DATA_WINDOW = 20

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
        self.dataset, self.num_workers = dataset, num_workers
        self._loader: Optional[DataLoader] = None  # built by fit, dropped when it ends
        self.scheduler = build_scheduler(optimizer, self.total_steps,
                                         int(round(warmup_epochs * self.steps_per_epoch)), min_lr)

        self.amp = amp
        self.amp_dtype = amp_dtype(amp)
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
        # seconds each step waited for its micro-batches (the progress bar's median of the last
        # DATA_WINDOW steps; TensorBoard's mean since the last write, the slowest process's)
        self._data_window: deque = deque(maxlen=self.DATA_WINDOW)
        self._data_since_log: List[float] = []
        self._signals = StopSignals(self._announce_stop)  # .signum: the first stop signal, once one arrived
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
        """Continue from the training checkpoint ``path`` (model, optimizer moments, scaler,
        step, RNG states), following this run's config.

        The schedule is the one this trainer was built with (its epochs, warm-up, learning
        rates, minimum lr), taken up at the checkpoint's step; the optimizer's settings
        (lr, weight decay, betas, layer-decay scales) are this run's too, only its moments
        come from the checkpoint. The keys of the config that changed since the checkpoint
        are printed with the lr the run continues at. What cannot be followed stops with
        one line (:class:`ResumeError`) before anything is loaded: another batch or data
        size (the step count would mean other images), a schedule that ends before the
        checkpoint's step, a model of another size.
        """
        ckpt = load_file(path)  # weights_only: nothing in the file can run code
        needed = ("model", "optimizer", "scaler", "scheduler", "epoch", "step", "step_in_epoch", "rng")
        lacking = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
        if lacking:
            raise CheckpointError(
                f"{path} is not a resumable training checkpoint (it lacks {', '.join(lacking)}); "
                "to start from its weights, pass it as the initial checkpoint instead (--finetune)"
            )
        changed = config_changes(ckpt.get("config"), self.config)
        self._check_resumable(ckpt, path, changed)
        self.model.load_state_dict(ckpt["model"])
        self._load_optimizer(ckpt["optimizer"], path)
        self.scaler.load_state_dict(ckpt["scaler"])
        # ckpt["scheduler"] is not loaded: the schedule is this run's, a function of the step
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
            if changed:
                print(self._describe_changes(ckpt, changed))

    def _check_resumable(self, ckpt: Dict[str, Any], path: str, changed: List[str]) -> None:
        """:class:`ResumeError` for what a resume cannot follow; nothing is loaded yet."""
        def refuse(why: str) -> ResumeError:
            keys = f" (changed since the checkpoint: {', '.join(changed)})" if changed else ""
            return ResumeError(f"cannot resume {path}: {why}{keys}")

        if ckpt["steps_per_epoch"] != self.steps_per_epoch or ckpt["effective_batch"] != self.effective_batch:
            raise refuse(
                f"it was written with batch {ckpt['effective_batch']} and {ckpt['steps_per_epoch']} steps per epoch, "
                f"this run has batch {self.effective_batch} and {self.steps_per_epoch}: its step count would "
                "stand for other images. Resume with the batch size and data it was trained with, or start "
                "a new run from its weights")
        if ckpt["step"] > self.total_steps:
            raise refuse(
                f"it is at step {ckpt['step']} (epoch {ckpt['epoch']}), past the end of this run's schedule "
                f"({self.epochs} epochs = {self.total_steps} steps); a schedule cannot end before the point "
                f"the run has reached. Give at least {math.ceil(ckpt['step'] / self.steps_per_epoch)} epochs")
        own = self.model.state_dict()
        try:
            check_shapes(ckpt["model"], own, path)
        except ShapeMismatchError as e:
            raise ResumeError(f"cannot resume {e}{_model_hint(changed)}") from None
        missing = [k for k in own if k not in ckpt["model"]]
        unexpected = [k for k in ckpt["model"] if k not in own]
        if missing or unexpected:
            first = (f"the model's tensor {missing[0]!r} is not in it" if missing
                     else f"its tensor {unexpected[0]!r} is not in the model")
            count = len(missing) + len(unexpected)
            raise ResumeError(f"cannot resume {path}: {first}" + (f" ({count - 1} more differ)" if count > 1 else "")
                              + f": the checkpoint is for a different model{_model_hint(changed)}")

    def _load_optimizer(self, state: Dict[str, Any], path: str) -> None:
        """The checkpoint's optimizer moments under this run's settings: ``load_state_dict``
        would bring back the checkpoint's lr, weight decay and layer-decay scales, which the
        config may have changed."""
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state)
        except ValueError as e:  # another number or size of parameter groups
            raise ResumeError(f"cannot resume {path}: its optimizer state does not fit this run's parameter "
                              f"groups ({e})") from None
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)

    def _describe_changes(self, ckpt: Dict[str, Any], changed: List[str]) -> str:
        """One line: the changed keys, and the lr the run continues at compared with the
        checkpoint's schedule (its saved state) at the same step."""
        line = (f"resuming with a changed config: {', '.join(changed)}; the run follows the new values from step "
                f"{self.step}: lr {self._lr_at(self.scheduler, self.step):.3g} now, ")
        old = ckpt.get("scheduler")
        if isinstance(old, dict) and all(k in old for k in ("t_initial", "warmup_t", "lr_min", "base_values")):
            was = copy.copy(self.scheduler)
            was.__dict__.update({k: v for k, v in old.items() if k != "optimizer"})
            line += f"{self._lr_at(was, self.step):.3g} under the checkpoint's schedule, "
        return line + f"ending at step {self.total_steps} with lr {self._lr_at(self.scheduler, self.total_steps):.3g}"

    def _lr_at(self, scheduler, step: int) -> float:
        """The largest group lr (the head's under layer decay) ``scheduler`` gives at ``step``."""
        values = scheduler._get_lr(step)
        return max(v * g.get("lr_scale", 1.0) for v, g in zip(values, self.optimizer.param_groups))

    # ----------------------------------------------------------------- loop
    def _announce_stop(self, signum: int) -> None:
        if self.info.is_main:
            print(f"\nsignal {signum}: saving a checkpoint after this step, then stopping "
                  "(press Ctrl-C again to abort without saving)")

    def _should_stop(self, stop_at_step: Optional[int]) -> bool:
        """Whether to stop after this step. Every rank must stop at the same step: they agree
        on the signal (:func:`~revcolv2.signals.agree_on_signal`), so a signal seen by one
        rank stops all of them, and every rank then knows which signal it was."""
        signum = agree_on_signal(self._signals.signum, self.info.device)
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
        return autocast(self.info.device, self.amp)

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
        if self._already_at(stop_at_step):
            return self.history
        self._announce()
        self._trim_log()
        clock = _Clock(self.step)
        self._stop_signal = 0
        self._loader = self.build_loader()
        try:
            with self._signals:  # SIGINT / SIGTERM: stop after this step; the old handlers come back
                while self.epoch < self.epochs:
                    if self._train_epoch(stop_at_step, clock):
                        self.save("checkpoint-last.pth")
                        return self._stopped(f"at step {self.step}")
                    saved = self._finish_epoch()
                    if self.epoch < self.epochs and self._should_stop(stop_at_step):
                        if not saved:
                            self.save("checkpoint-last.pth")
                        return self._stopped(f"after epoch {self.epoch}")
        finally:
            self._close()
        if self.info.is_main:
            print(f"{self.name} finished: {self.step - clock.start_step} steps in {format_seconds(clock.elapsed())}")
        return self.history

    # ----------------------------------------------------------------- the steps of fit
    def build_loader(self) -> DataLoader:
        """The training loader, built once per :meth:`fit`; its workers live until fit ends."""
        return DataLoader(
            SeededSamples(self.dataset, self.seed), batch_size=self.micro_batch, sampler=self.sampler,
            num_workers=self.num_workers, pin_memory=self.info.device.type == "cuda",
            persistent_workers=self.num_workers > 0, drop_last=False, worker_init_fn=ignore_stop_signals,
            # its own generator: creating an iterator must not draw from the global RNG,
            # or a run resumed mid-epoch would diverge from an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _already_at(self, stop_at_step: Optional[int]) -> bool:
        """Whether ``stop_at_step`` is already reached (a run resumed at or past it): then
        nothing is trained, and the message says so."""
        if stop_at_step is None or self.step < stop_at_step:
            return False
        if self.info.is_main:
            print(f"--stop-at-step {stop_at_step}: the run is already at step {self.step}; nothing to train")
        return True

    def _announce(self) -> None:
        if self.info.is_main:
            print(f"{self.name}: {self.epochs} epochs x {self.steps_per_epoch} steps, effective batch "
                  f"{self.effective_batch} = {self.info.world_size} process(es) x {self.micro_batch} x "
                  f"{self.accum} accumulation, device {self.info.device}, "
                  f"amp {self.amp_dtype if self.use_amp else 'off'}")

    def _trim_log(self) -> None:
        """Drop the ``log.jsonl`` records past the step this run starts from: it writes them again."""
        if self.info.is_main:
            dropped = trim_log(os.path.join(self.output_dir, LOG_FILE), self.step)
            if dropped:
                print(f"{LOG_FILE}: dropped {dropped} record(s) past step {self.step}, which this run repeats")

    def _train_epoch(self, stop_at_step: Optional[int], clock: "_Clock") -> bool:
        """The remaining steps of the epoch in progress; True when a stop (a signal or
        ``stop_at_step``) came before its last step."""
        from tqdm import tqdm

        self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * self.micro_batch * self.accum)
        batches = iter(self._loader)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                   desc=f"{self.name} epoch {self.epoch + 1}/{self.epochs}", disable=not self.info.is_main,
                   dynamic_ncols=True, mininterval=1.0, leave=True)
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                waited = time.perf_counter()
                micro_batches = [next(batches) for _ in range(self.accum)]
                data_time = time.perf_counter() - waited
                loss = self.train_step(micro_batches)
                del micro_batches
                self._record_step(loss, data_time, bar, clock)
                if self.step_in_epoch < self.steps_per_epoch and self._should_stop(stop_at_step):
                    return True
            return False
        finally:
            bar.close()
            # not even the frame of a traceback may keep the loader's iterator (its workers) alive
            del batches

    def _record_step(self, loss: float, data_time: float, bar, clock: "_Clock") -> None:
        """The step's loss and data time into the history, the progress bar and (every
        ``log_every`` steps and at the end of an epoch) TensorBoard: the loss averaged over
        processes, the data time the slowest process's mean since the last write."""
        self.history[self.step] = loss
        self._epoch_losses.append(loss)
        self._data_window.append(data_time)
        self._data_since_log.append(data_time)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.current_lr():.2e}",
                        data=f"{statistics.median(self._data_window):.3f}s",
                        eta=format_seconds(clock.eta(self.step, self.total_steps)), refresh=False)
        bar.update(1)
        if self.step % self.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
            mean_loss = all_reduce_sum(torch.tensor([loss], device=self.info.device), self.info)
            mean_loss = mean_loss.item() / self.info.world_size
            waited = torch.tensor([sum(self._data_since_log) / len(self._data_since_log)], device=self.info.device)
            self._data_since_log = []
            self.tb.scalars({f"{self.name}/loss": mean_loss, f"{self.name}/lr": self.current_lr(),
                             f"{self.name}/data_time": all_reduce_max(waited, self.info).item()}, self.step)

    def _finish_epoch(self) -> bool:
        """After the last step of an epoch: its evaluation (:meth:`end_of_epoch`), one
        ``log.jsonl`` record, TensorBoard scalars, the epoch checkpoint. Returns whether a
        resumable checkpoint was written."""
        epoch = self.epoch
        self.epoch, self.step_in_epoch = epoch + 1, 0
        metrics = self.end_of_epoch(epoch)
        metrics = dict(metrics, epoch=epoch + 1, step=self.step,
                       train_loss=float(np.mean(self._epoch_losses)) if self._epoch_losses else float("nan"))
        self._epoch_losses = []
        self.tb.scalars({f"epoch/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")}, self.epoch)
        if self.info.is_main:
            with open_append(os.path.join(self.output_dir, LOG_FILE)) as f:  # never through a link
                f.write(json_line(metrics) + "\n")
        return self.save_epoch_checkpoint(epoch + 1)

    def _close(self) -> None:
        """However fit ended: close TensorBoard and end the loader workers. They ignore
        SIGTERM, so the SIGTERM that multiprocessing sends its daemon children at exit would
        not end them, and the process would wait for them forever: dropping the loader (the
        only reference left, see :meth:`_train_epoch`) shuts them down."""
        self.tb.close()
        self._loader = None
        gc.collect()

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
