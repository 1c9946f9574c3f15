"""RevColV2: reversible bottom-up / top-down columns for masked image modeling.

Importing this package registers ``revcolv2_tiny``, ``revcolv2_base`` and
``revcolv2_large`` with timm.
"""
from .checkpoint import load_checkpoint
from .layer_decay import layer_id, lr_factor_func, lr_scale, num_layers
from .model import MODEL_CFGS, RevColV2, create_revcolv2, revcolv2_base, revcolv2_large, revcolv2_tiny

__all__ = [
    "MODEL_CFGS", "RevColV2", "create_revcolv2", "layer_id", "load_checkpoint", "lr_factor_func", "lr_scale",
    "num_layers", "revcolv2_base", "revcolv2_large", "revcolv2_tiny",
]
__version__ = "0.1.0"
