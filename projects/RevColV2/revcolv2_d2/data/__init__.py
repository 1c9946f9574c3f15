"""Dataset registration for the RevColV2 detectron2 project.

COCO 2017 and ADE20K (``coco_2017_*``, ``ade20k_sem_seg_*``) are registered by detectron2
itself from ``$DETECTRON2_DATASETS`` (default ``./datasets``, in the working directory). This
package adds the built-in synthetic datasets that the demos and tests generate on first use
under the same folder, :func:`revcolv2.data.datasets_root`.
"""
from revcolv2.data import datasets_root


def register_all(root: str = None) -> None:
    """Register every built-in dataset of the project, and have every COCO-format dataset
    (detectron2's ``coco_2017_*`` included) checked when it is loaded (idempotent)."""
    from .coco_checks import check_registered_coco_datasets
    from .synthetic_ade20k import register_synthetic_ade
    from .synthetic_shapes import register_synthetic_shapes

    root = root or datasets_root()
    register_synthetic_shapes(root)
    register_synthetic_ade(root)
    check_registered_coco_datasets()
