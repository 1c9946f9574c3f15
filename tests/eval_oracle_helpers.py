"""Shared by the evaluation oracles: re-register detectron2's built-in dataset names on a
tiny copy of the real folder layout, and load a config's test loader and evaluator."""
import contextlib
import os

from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "projects", "RevColV2", "configs")


@contextlib.contextmanager
def builtin_names_on(names, register):
    """Temporarily point detectron2's built-in dataset ``names`` at another root.

    detectron2 registers ``coco_2017_val`` / ``ade20k_sem_seg_val`` from
    ``$DETECTRON2_DATASETS`` once, when it is imported; ``register()`` re-runs that
    registration for a tmp root. The original entries come back afterwards.
    """
    # both catalogs are dicts: name -> loader function / Metadata
    saved = {n: (DatasetCatalog[n] if n in DatasetCatalog else None,
                 MetadataCatalog[n] if n in MetadataCatalog else None) for n in names}
    for n in names:
        if n in DatasetCatalog:
            DatasetCatalog.remove(n)
        if n in MetadataCatalog:
            MetadataCatalog.remove(n)
    try:
        register()
        yield
    finally:
        for n, (func, meta) in saved.items():
            if n in DatasetCatalog:
                DatasetCatalog.remove(n)
            if n in MetadataCatalog:
                MetadataCatalog.remove(n)
            if func is not None:
                DatasetCatalog.register(n, func)
            if meta is not None:
                MetadataCatalog[n] = meta


def load_config(rel: str, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(CONFIGS, rel)), list(overrides))


def config_loader_and_evaluator(cfg, output_dir: str):
    """The config's own test loader (one process, no workers) and evaluator."""
    cfg.dataloader.test.num_workers = 0
    if "output_dir" in cfg.dataloader.evaluator or cfg.dataloader.evaluator._target_.__name__ == "COCOEvaluator":
        cfg.dataloader.evaluator.output_dir = output_dir
    return instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
