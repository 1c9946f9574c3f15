"""The one layer-wise learning-rate decay rule (RevCol v1), shared by every trainer.

Parameters sit on a grid of (block position within its column, column index):

    id = position + column + 1            a block (position = execution order in the column)
    id of the level's first block         a level's fusion
    id of the column's first block        a column's alphas  (= column + 1)
    0                                     patch embedding, position embedding, mask token
    max_id + 1                            everything else: heads, necks, FPN, decoders

and the learning-rate scale is ``decay ** (max_id + 1 - id)``, so heads get 1.

The functions take a parameter *name*, so they work on any wrapper that keeps the
backbone's names below a prefix (``backbone.net.columns.3...`` in detectron2).
"""
from __future__ import annotations

import re
from typing import Callable

_BLOCK = re.compile(r"(?:^|\.)columns\.(\d+)\.levels\.(\d+)\.blocks\.(\d+)\.")
_FUSION = re.compile(r"(?:^|\.)columns\.(\d+)\.levels\.(\d+)\.fusion\.")
_ALPHA = re.compile(r"(?:^|\.)columns\.(\d+)\.alphas$")
_STEM = re.compile(r"(?:^|\.)(patch_embed|pos_embed|mask_token)(?:\.|$)")


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


def lr_scale(name: str, decay: float, num_levels: int, blocks_per_level: int, num_bu_columns: int, num_td_columns: int) -> float:
    """Learning-rate multiplier ``decay ** (max_id + 1 - id)`` of parameter ``name``."""
    top = max_layer_id(num_levels, blocks_per_level, num_bu_columns, num_td_columns) + 1
    return decay ** (top - layer_id(name, num_levels, blocks_per_level, num_bu_columns, num_td_columns))


def lr_factor_func(decay: float, num_levels: int = 4, blocks_per_level: int = 1,
                   num_bu_columns: int = 2, num_td_columns: int = 1) -> Callable[[str], float]:
    """``name -> lr scale``, the form detectron2's ``get_default_optimizer_params`` takes."""
    def factor(name: str) -> float:
        return lr_scale(name, decay, num_levels, blocks_per_level, num_bu_columns, num_td_columns)

    return factor
