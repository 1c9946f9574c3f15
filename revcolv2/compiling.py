"""Compiling a model for training with ``torch.compile``: what ``--compile`` of the training
tools and ``train.compile`` of the detectron2 configs do."""
from typing import List

from torch import nn

from .layers import allow_level_recompiles
from .model import RevColV2

__all__ = ["allow_level_recompiles", "compile_for_training"]


def compile_for_training(module: nn.Module, **compile_kwargs) -> List[str]:
    """``torch.compile`` a model for training, in place (its ``state_dict`` keys, and so its
    checkpoints, do not change); what ``--compile`` and detectron2's ``train.compile`` do.

    - A reversible RevColV2 inside ``module``: :meth:`RevColV2.compile_levels` (the reversible
      engine is an autograd function that rebuilds activations in backward, which dynamo
      cannot trace; each level's F_l is compiled instead, and the engine runs them). This
      needs the recompile limit raised first, a process-wide switch that the program sets
      where it starts: :func:`allow_level_recompiles`.
    - Otherwise ``module`` as a whole (``nn.Module.compile``): a plain RevColV2, the MIM
      model, a linear probe on its frozen backbone.

    Compile after copying the model (an EMA copy made later would share the compiled call of
    the original). Compilation happens at the first forward. Returns one line per compiled
    part, for the log.
    """
    reversible = [m for m in module.modules() if isinstance(m, RevColV2) and m.reversible]
    if reversible:
        for m in reversible:
            m.compile_levels(**compile_kwargs)
        return [f"{type(m).__name__} (reversible): compile_levels(), each level's F_l" for m in reversible]
    module.compile(**compile_kwargs)
    return [f"{type(module).__name__}: torch.compile of the whole module"]
