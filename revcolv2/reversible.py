"""Reversible engine: run a sequence of RevColV2 columns without storing their activations.

A column maps ``(source, prev_state) -> new_state`` where a state is a tuple of per-level
token tensors, and it can be inverted: ``prev_state = column.inverse(source, new_state)``
(see ``revcolv2.model.Column``). :class:`ReversibleColumns` exploits this in the classic
RevNet way: the forward pass keeps only ``source``, the last column's state and the
drop-path masks; the backward pass walks the columns last to first and, level by level,
evaluates ``F_l`` once with autograd on, uses its value to rebuild the previous column's
level (``(c_l - F_l) / alpha_l``) and its graph to back-propagate.

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
            has_prev = j > 0 or ctx.num_prev > 0
            prev, grad_prev, g_src = _column_backward(
                columns[j], source, state, grad_state, has_prev, _masks_at(drop_masks, j), hw,
                param_grads, (ctx.device_type, dtype, enabled),
            )
            grad_source = _add(grad_source, g_src)
            if has_prev:
                state, grad_state = prev, grad_prev

        grad_prev = tuple(grad_state) if ctx.num_prev else ()
        params = _segment_params(columns)
        grad_params = tuple(param_grads.get(p) for p in params)
        return (None, None, None, grad_source, None, *grad_prev, *grad_params)


def _column_backward(column, source, new, grad_new, has_prev, keep, hw, param_grads, autocast):
    """Rebuild a column's input state from its output and back-propagate through it.

    Levels are visited against the update order. For each level ``F_l`` is evaluated once,
    with autograd on: its value rebuilds ``c_l(prev) = (c_l - F_l) / alpha_l`` and its graph
    gives the gradients, so a column costs one forward and one backward (no separate
    inversion pass). Returns (previous state, its gradient, gradient of ``source``).
    """
    n = len(column.levels)
    grad_new = list(grad_new)
    prev: List[Optional[Tensor]] = [None] * n
    grad_prev: List[Optional[Tensor]] = [None] * n
    grad_source = None
    device_type, dtype, enabled = autocast
    for i in range(n - 1, -1, -1):
        l = column.order[i]
        c = column._cross_index(l)
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            inp = (source if i == 0 else new[column.order[i - 1]]).detach().requires_grad_(True)
            cross = prev[c] if has_prev and 0 <= c < n else None
            cross = cross.detach().requires_grad_(True) if cross is not None else None
            f = column.levels[l](inp, cross, column._level_keep(keep, l), hw)
            inputs = [inp] + ([cross] if cross is not None else [])
            if has_prev:
                alpha = column._alpha(l)
                with torch.no_grad():
                    prev_l = (new[l] - f) / alpha
                prev_l.requires_grad_(True)
                out = alpha * prev_l + f  # == new[l], with the graph of the update
                inputs.append(prev_l)
            else:
                out = f
        params = [p for p in column.levels[l].parameters() if p.requires_grad]
        if has_prev and column.alphas.requires_grad:
            params.append(column.alphas)
        grads = torch.autograd.grad(out, inputs + params, grad_new[l], allow_unused=True)
        g_inp, rest = grads[0], list(grads[1:len(inputs)])
        if i == 0:
            grad_source = g_inp
        else:
            k = column.order[i - 1]
            grad_new[k] = _add(grad_new[k], g_inp)
        if cross is not None:
            grad_prev[c] = _add(grad_prev[c], rest.pop(0))
        if has_prev:
            prev[l] = prev_l.detach()
            grad_prev[l] = _add(grad_prev[l], rest.pop(0))
        for p, g in zip(params, grads[len(inputs):]):
            if g is not None:
                param_grads[p] = _add(param_grads.get(p), g)
    if not has_prev:
        return None, None, grad_source
    grad_prev = [torch.zeros_like(p) if g is None else g for p, g in zip(prev, grad_prev)]
    return tuple(prev), grad_prev, grad_source


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
