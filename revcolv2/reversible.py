"""Reversible engine: run a sequence of RevColV2 columns without storing their activations.

A column maps ``(source, prev_state) -> new_state`` where a state is a tuple of per-level
token tensors, and it can be inverted: ``prev_state = column.inverse(source, new_state)``
(see ``revcolv2.model.Column``). :class:`ReversibleColumns` exploits this in the classic
RevNet way: the forward pass keeps only ``source``, the last column's state and the
drop-path masks; the backward pass walks the columns last to first, rebuilds each
column's input state by inversion, re-runs that one column with autograd enabled and
back-propagates through it.

What is replayed exactly in the rebuild:
- drop-path: the per-sample keep masks are drawn once per forward (outside this function)
  and passed in as a tensor, so inversion and recomputation use the very same masks;
- autocast: the forward's autocast state (enabled, dtype) is recorded and re-entered.

Memory therefore stays constant in the number of columns (plus one ``(B, num_blocks, 2)``
mask tensor), at the price of one extra column forward (the inversion) per column.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

State = Tuple[Tensor, ...]


def _autocast_state(device_type: str) -> Tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class ReversibleColumns(torch.autograd.Function):
    """autograd Function over a run of invertible columns.

    Inputs: ``columns`` (list of Column modules), ``hw`` (token grid or None),
    ``num_prev`` (0 when the first column starts from nothing, else the number of state
    tensors that follow), ``source``, ``drop_masks`` ((num_columns, B, blocks, 2) or an empty
    tensor), ``*prev_state``, ``*params``. Returns the last column's state.
    """

    @staticmethod
    def forward(ctx, columns, hw, num_prev: int, source: Tensor, drop_masks: Tensor, *rest):
        prev: Optional[State] = tuple(rest[:num_prev]) if num_prev else None
        params = rest[num_prev:]
        device_type = source.device.type
        ctx.columns, ctx.hw, ctx.num_prev, ctx.num_params = columns, hw, num_prev, len(params)
        ctx.device_type = device_type
        ctx.autocast = _autocast_state(device_type)
        state = prev
        with torch.no_grad():
            for j, column in enumerate(columns):
                state = column(source, state, _masks_at(drop_masks, j), hw)
        ctx.save_for_backward(source, drop_masks, *state)
        return tuple(state)

    @staticmethod
    def backward(ctx, *grad_state):
        source, drop_masks, *state = ctx.saved_tensors
        columns, hw = ctx.columns, ctx.hw
        enabled, dtype = ctx.autocast
        state = [s.detach() for s in state]
        grad_state = [torch.zeros_like(s) if g is None else g for s, g in zip(state, grad_state)]
        grad_source = torch.zeros_like(source)
        param_grads = {}

        for j in range(len(columns) - 1, -1, -1):
            column = columns[j]
            masks = _masks_at(drop_masks, j)
            has_prev = j > 0 or ctx.num_prev > 0
            with torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                # 1. rebuild this column's input state from its output.
                with torch.no_grad():
                    prev = column.inverse(source, tuple(state), masks, hw) if has_prev else None
                # 2. re-run the column with autograd on and back-propagate through it.
                with torch.enable_grad():
                    src = source.detach().requires_grad_(True)
                    prev_in = [p.detach().requires_grad_(True) for p in prev] if has_prev else []
                    out = column(src, tuple(prev_in) if has_prev else None, masks, hw)
            col_params = [p for p in column.parameters() if p.requires_grad]
            grads = torch.autograd.grad(
                out, [src, *prev_in, *col_params], grad_state, allow_unused=True
            )
            grad_source = _add(grad_source, grads[0])
            for p, g in zip(col_params, grads[1 + len(prev_in):]):
                if g is not None:
                    param_grads[p] = _add(param_grads.get(p), g)
            if has_prev:
                state = list(prev)
                grad_state = [
                    torch.zeros_like(p) if g is None else g
                    for p, g in zip(prev, grads[1:1 + len(prev_in)])
                ]

        grad_prev = tuple(grad_state) if ctx.num_prev else ()
        params = _segment_params(columns)
        grad_params = tuple(param_grads.get(p) for p in params)
        return (None, None, None, grad_source, None, *grad_prev, *grad_params)


def _masks_at(drop_masks: Tensor, j: int) -> Optional[Tensor]:
    return drop_masks[j] if drop_masks.numel() else None


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _segment_params(columns: Sequence[nn.Module]) -> List[Tensor]:
    return [p for column in columns for p in column.parameters() if p.requires_grad]


def run_reversible(
    columns: Sequence[nn.Module],
    source: Tensor,
    prev_state: Optional[State],
    drop_masks: Tensor,
    hw: Optional[Tuple[int, int]],
) -> State:
    """Run ``columns`` through :class:`ReversibleColumns` (activation memory O(1) in columns)."""
    prev = tuple(prev_state) if prev_state is not None else ()
    params = _segment_params(columns)
    return ReversibleColumns.apply(
        list(columns), hw, len(prev), source, drop_masks, *prev, *params
    )


def run_plain(
    columns: Sequence[nn.Module],
    source: Tensor,
    prev_state: Optional[State],
    drop_masks: Tensor,
    hw: Optional[Tuple[int, int]],
) -> State:
    """Ordinary autograd through the same columns (stores every activation)."""
    state = prev_state
    for j, column in enumerate(columns):
        state = column(source, state, _masks_at(drop_masks, j), hw)
    return state
