"""The training loader of the project's detection and segmentation configs.

:func:`build_train_loader` is detectron2's ``build_detection_train_loader``: the same
arguments (and ``from_config``), the same datasets, samplers, batches and per-worker seeds.
One difference: its loader workers also ignore SIGINT / SIGTERM
(:func:`revcolv2.signals.ignore_stop_signals`), so a signal to the process group (a
scheduler, Ctrl-C) leaves the stop, and its checkpoint, to the trainer (docs/OPERATIONS.md,
"What signals do"). detectron2 fixes the workers' ``worker_init_fn`` inside its
``build_batch_data_loader``, so the loader is assembled here from detectron2's parts.

A config that still names detectron2's builder (the ``config.yaml`` of an older run) trains
the same, with workers that a stop signal ends.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.utils.data as torchdata
from detectron2.config import configurable
from detectron2.data.build import _train_loader_from_config, trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import AspectRatioGroupedDataset, DatasetFromList, MapDataset, ToIterableDataset
from detectron2.data.samplers import TrainingSampler
from detectron2.utils.comm import get_world_size

from revcolv2.signals import ignore_stop_signals

logger = logging.getLogger("detectron2").getChild(__name__)


def train_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the training loader: SIGINT / SIGTERM ignored, then detectron2's
    per-worker seed (``torch.initial_seed() % 2**31 + worker_id`` for every RNG)."""
    ignore_stop_signals()
    worker_init_reset_seed(worker_id)


@configurable(from_config=_train_loader_from_config)
def build_train_loader(dataset, *, mapper, sampler=None, total_batch_size, aspect_ratio_grouping=True,
                       num_workers=0, collate_fn=None, **kwargs):
    """detectron2's ``build_detection_train_loader(dataset, mapper=..., total_batch_size=...,
    ...)``, whose workers run :func:`train_worker_init`.

    ``dataset``: a list of dataset dicts or a torch dataset (map-style or iterable);
    ``mapper``: dataset dict -> model input; ``sampler``: for a map-style dataset, default
    detectron2's infinite shuffled ``TrainingSampler``; ``total_batch_size``: over all
    processes; ``aspect_ratio_grouping``: batch images of similar aspect ratio;
    ``collate_fn``: default none (a batch is a list). Other keyword arguments
    (``drop_last``, ``single_gpu_batch_size``, ``seed``, DataLoader options) as detectron2's
    ``build_batch_data_loader`` takes them.
    """
    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=False)
    if mapper is not None:
        dataset = MapDataset(dataset, mapper)
    if isinstance(dataset, torchdata.IterableDataset):
        if sampler is not None:
            raise ValueError("build_train_loader: an iterable dataset takes no sampler (sampler must be None)")
    else:
        if sampler is None:
            sampler = TrainingSampler(len(dataset))
        if not isinstance(sampler, torchdata.Sampler):
            raise TypeError(f"build_train_loader: sampler must be a torch.utils.data.Sampler, got {type(sampler)}")
    return _batch_data_loader(dataset, sampler, total_batch_size, aspect_ratio_grouping=aspect_ratio_grouping,
                              num_workers=num_workers, collate_fn=collate_fn, **kwargs)


def _batch_data_loader(dataset, sampler, total_batch_size, *, aspect_ratio_grouping=False, num_workers=0,
                       collate_fn=None, drop_last: bool = True, single_gpu_batch_size=None, seed=None, **kwargs):
    """detectron2's ``build_batch_data_loader`` with :func:`train_worker_init` as the workers'
    init: batches of ``total_batch_size / processes`` (or ``single_gpu_batch_size``) images,
    grouped by aspect ratio when asked, not collated unless ``collate_fn`` is given."""
    if single_gpu_batch_size:
        if total_batch_size:
            raise ValueError("total_batch_size and single_gpu_batch_size are mutually incompatible: "
                             "give only one of them")
        batch_size = single_gpu_batch_size
    else:
        world_size = get_world_size()
        if not (total_batch_size > 0 and total_batch_size % world_size == 0):
            raise ValueError(f"dataloader.train.total_batch_size ({total_batch_size}) must be a positive multiple "
                             f"of the number of processes ({world_size})")
        batch_size = total_batch_size // world_size
    logger.info("Making batched data loader with batch_size=%d", batch_size)

    if isinstance(dataset, torchdata.IterableDataset):
        if sampler is not None:
            raise ValueError("an iterable dataset takes no sampler (sampler must be None)")
    else:
        dataset = ToIterableDataset(dataset, sampler, shard_chunk_size=batch_size)

    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)

    if aspect_ratio_grouping:
        if not drop_last:
            raise ValueError("aspect ratio grouping drops incomplete batches: it needs drop_last=True")
        data_loader = torchdata.DataLoader(
            dataset, num_workers=num_workers, collate_fn=operator.itemgetter(0),  # single elements, not batches
            worker_init_fn=train_worker_init, generator=generator, **kwargs)
        data_loader = AspectRatioGroupedDataset(data_loader, batch_size)
        return data_loader if collate_fn is None else MapDataset(data_loader, collate_fn)
    return torchdata.DataLoader(
        dataset, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
        collate_fn=trivial_batch_collator if collate_fn is None else collate_fn,
        worker_init_fn=train_worker_init, generator=generator, **kwargs)
