"""The one layer-wise learning-rate decay rule (RevCol v1), shared by every trainer.

Parameters sit on a grid of (block position within its column, column index):

    id = position + column + 1            a block (position = execution order in the column)
    id of the level's first block         a level's fusion
    id of the column's first block        a column's alphas  (= column + 1)
    0                                     patch embedding, mask token (the position
                                          embedding is a fixed sin-cos: no parameter)
    max_id + 1                            everything else: heads, necks, FPN, decoders

and the learning-rate scale is ``decay ** (max_id + 1 - id)``, so heads get 1.

The functions take a parameter *name*, so they work on any wrapper that keeps the
backbone's names below a prefix (``backbone.net.columns.3...`` in detectron2). The layout
(levels, blocks per level, BU and TD columns) is always read from a built RevColV2 module
(:func:`lr_factor_func`, ``RevColV2.layer_id``), never from a preset name, so a config
that overrides the column counts gets the ids of the model it actually trains.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

_BLOCK = re.compile(r"(?:^|\.)columns\.(\d+)\.levels\.(\d+)\.blocks\.(\d+)\.")
_FUSION = re.compile(r"(?:^|\.)columns\.(\d+)\.levels\.(\d+)\.fusion\.")
_ALPHA = re.compile(r"(?:^|\.)columns\.(\d+)\.alphas$")
_STEM = re.compile(r"(?:^|\.)(patch_embed|mask_token)(?:\.|$)")


def max_layer_id(num_levels: int, blocks_per_level: int, num_bu_columns: int, num_td_columns: int) -> int:
    return (num_levels * blocks_per_level - 1) + (num_bu_columns + num_td_columns - 1) + 1


def num_layers(num_levels: int, blocks_per_level: int, num_bu_columns: int, num_td_columns: int) -> int:
    """Number of distinct layer ids (0 .. max_id + 1)."""
    return max_layer_id(num_levels, blocks_per_level, num_bu_columns, num_td_columns) + 2


def _position(column: int, level: int, block: int, num_levels: int, blocks_per_level: int, num_bu_columns: int) -> int:
    """Execution position of a block in its column: BU columns run levels upwards, TD downwards."""
    level_pos = level if column < num_bu_columns else num_levels - 1 - level
    return level_pos * blocks_per_level + block


def layer_id(name: str, num_levels: int, blocks_per_level: int, num_bu_columns: int, num_td_columns: int) -> int:
    """Layer id of parameter ``name`` under the RevCol rule (module docstring)."""
    m = _BLOCK.search(name)
    if m:
        j, l, b = map(int, m.groups())
        return _position(j, l, b, num_levels, blocks_per_level, num_bu_columns) + j + 1
    m = _FUSION.search(name)
    if m:
        j, l = map(int, m.groups())
        return _position(j, l, 0, num_levels, blocks_per_level, num_bu_columns) + j + 1
    m = _ALPHA.search(name)
    if m:
        return int(m.group(1)) + 1
    if _STEM.search(name):
        return 0
    return max_layer_id(num_levels, blocks_per_level, num_bu_columns, num_td_columns) + 1


def lr_scale(name: str, decay: float, num_levels: int, blocks_per_level: int, num_bu_columns: int,
             num_td_columns: int) -> float:
    """Learning-rate multiplier ``decay ** (max_id + 1 - id)`` of parameter ``name``."""
    top = max_layer_id(num_levels, blocks_per_level, num_bu_columns, num_td_columns) + 1
    return decay ** (top - layer_id(name, num_levels, blocks_per_level, num_bu_columns, num_td_columns))


def find_revcolv2(model: nn.Module) -> nn.Module:
    """The RevColV2 module inside ``model`` (``model`` itself, a detectron2 backbone's
    ``net``, ...): the first submodule that carries the layer-id rule."""
    for module in model.modules():
        if hasattr(module, "columns") and callable(getattr(module, "layer_id", None)):
            return module
    raise ValueError(f"{type(model).__name__} holds no RevColV2 module: no layer ids to decay by")


def lr_factor_func(decay: float, model: nn.Module) -> Callable[[str], float]:
    """``name -> lr scale`` for the RevColV2 inside ``model`` (detectron2's ``lr_factor_func``).

    The layout comes from the built module; names outside it (necks, heads) get scale 1.
    """
    net = find_revcolv2(model)
    layout = (net.num_levels, net.blocks_per_level, net.num_bu_columns, net.num_td_columns)

    def factor(name: str) -> float:
        return lr_scale(name, decay, *layout)

    return factor
