"""Reversible engine: train a run of RevColV2 columns without storing their activations.

A column updates level ``l`` as ``c_l(j) = alpha_l * c_l(j-1) + F_l(in, cross)`` (see
:class:`revcolv2.model.Column`; the wiring, which level feeds ``in`` and which level of the
previous column is ``cross``, is ``revcolv2.plan``'s). The update can be undone:
``c_l(j-1) = (c_l(j) - F_l(in, cross)) / alpha_l``.

Design (one autograd node per (column, level) update):

- **Forward** runs every update without a graph (inside :class:`_LevelStep`). A per-run
  :class:`RunBuffer` keeps, detached, only the run's ``source``, its external previous
  state (the BU state handed to the TD run: the very tensors, so it is stored once) and
  the newest value of every level (the run's outputs). Each stored value has a use count:
  the number of backward nodes that will read it. The last reader drops it.
- **Backward** of node ``(j, l)`` runs after every consumer of its output (autograd's own
  dependency order guarantees that the level's newer value and its inputs ``in`` / ``cross``
  were rebuilt by then). It (1) evaluates ``F_l`` once with a graph, (2) rebuilds
  ``c_l(j-1) = (c_l(j) - F) / alpha`` cast back to the dtype the forward produced, and
  stores it for its readers, (3) computes the alpha update's gradients directly
  (``g * alpha`` and ``sum(g * c_l(j-1))``) and (4) returns ``F_l``'s parameter gradients,
  which reach ``.grad`` (and fire DDP's hooks) level by level.
- ``set_materialize_grads(False)``: a node whose output receives no gradient does no
  gradient work and returns ``None`` for everything, as plain autograd does; it still
  rebuilds its previous value if another node reads it.
- **Only what an output needs runs**: the caller gives, per column, the prefix of its
  update order to run (``revcolv2.plan.ColumnPlan.counts``). Skipped levels are neither
  computed nor rebuilt, in plain and reversible mode alike.
- **The last update may retain its graph** (``retain_last_graph``): its backward is the
  first to run, so evaluating its ``F_l`` again there would only rebuild, at once, the
  graph the forward just dropped. Its forward builds the graph instead and its backward
  uses it: one evaluation of that level fewer per step. The graph lives from the end of the
  forward until the backward reaches it (after the heads' backward), so it adds to the
  activation peak wherever the end of the forward is the step's peak. The engine decides
  per run: it retains the graph only when no parameter of that level holds a gradient at
  the forward. Then the backward allocates the gradients, whose bytes lie above the end of
  the forward (the step's peak comes later, in the backward); when they are already held
  (the micro-batches of gradient accumulation after the first, ``zero_grad(set_to_none=
  False)``) nothing is allocated there, and the level is rebuilt instead. Measured figures
  are in ``docs/BENCHMARKS.md``. ``retain_last_graph=False`` turns it off altogether (heads
  whose activations are large while the backbone's graph waits).

Replayed exactly in the rebuild: drop path (per-sample scales drawn once per forward and
passed in), autocast (state recorded at forward, re-entered in backward) and dtypes (a
rebuilt value is cast to the dtype the forward produced for it).

A second backward through the same graph raises a ``RuntimeError``: the buffer frees every
value after its last use (see ``docs/ARCHITECTURE.md``).
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

State = Tuple[Optional[Tensor], ...]
SRC = "source"


def _autocast_state(device_type: str) -> Tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class RunBuffer:
    """What one reversible run keeps for its backward, keyed ``SRC`` or ``(column, level)``.

    Column ``-1`` is the run's external previous state. Values are detached aliases (no
    copies); ``uses[key]`` counts the backward nodes that will still read ``key``.
    """

    def __init__(self, columns: Sequence[nn.Module], drop_scales: Optional[Tensor], hw, device_type: str,
                 retained: Optional[Tuple[int, int]] = None):
        self.columns = list(columns)
        self.drop_scales = drop_scales
        self.hw = hw
        self.device_type = device_type
        self.autocast = _autocast_state(device_type)
        self.values: Dict[Hashable, Tensor] = {}
        self.versions: Dict[Hashable, int] = {}
        self.uses: Dict[Hashable, int] = {}
        self.dtypes: Dict[Hashable, torch.dtype] = {}
        self.alphas: Dict[Tuple[int, int], Tensor] = {}
        # the node whose forward retains F's graph for its backward, and that graph:
        # (F with its graph, the detached inputs it was built on: in, cross)
        self.retained = retained
        self.graphs: Dict[Tuple[int, int], Tuple[Tensor, Tensor, Optional[Tensor]]] = {}

    # ----------------------------------------------------------------- bookkeeping
    def expect(self, key: Hashable) -> None:
        self.uses[key] = self.uses.get(key, 0) + 1

    def store(self, key: Hashable, t: Tensor) -> None:
        """Keep ``t`` (detached alias) if some backward node will read it."""
        if self.uses.get(key, 0) > 0:
            self.values[key] = t.detach()
            self.versions[key] = t._version

    def take(self, key: Hashable) -> Tensor:
        """The value at ``key`` for one reader; dropped after its last reader."""
        t = self.get(key)
        left = self.uses.get(key, 0) - 1
        if left > 0:
            self.uses[key] = left
        else:
            self.uses.pop(key, None)
            self.values.pop(key, None)
            self.versions.pop(key, None)
        return t

    def get(self, key: Hashable) -> Tensor:
        if key not in self.values:
            self._rebuild_missing(key)
        t = self.values[key]
        if key in self.versions and t._version != self.versions[key]:
            raise RuntimeError(
                f"RevColV2 reversible engine: the value {key} of a column state was modified in place "
                "after the forward pass; the reversible backward needs it unchanged (clone it before "
                "modifying it, or use reversible=False)")
        return t

    def scales(self, j: int) -> Optional[Tensor]:
        """Drop-path scales of column ``j`` (None: drop path off)."""
        return None if self.drop_scales is None else self.drop_scales[j]

    def autocast_ctx(self):
        enabled, dtype = self.autocast
        return torch.autocast(self.device_type, dtype=dtype, enabled=enabled)

    def _rebuild_missing(self, key: Hashable) -> None:
        """Rebuild ``(j, l)`` without a graph when the node that normally rebuilds it,
        ``(j + 1, l)``, never runs because no gradient reaches it (a loss that ignores some
        outputs). The value is kept until the graph is freed."""
        if key == SRC or key[0] < 0 or key[0] + 1 >= len(self.columns) or (key[0] + 1, key[1]) not in self.dtypes:
            raise RuntimeError(
                f"RevColV2 reversible engine: state {key} is no longer available. A second backward "
                "through the same graph is not supported (values are freed after their last use): "
                "run the forward again, or use reversible=False")
        j, l = key[0] + 1, key[1]
        if (j, l) in self.graphs:
            f = self.graphs[(j, l)][0].detach()
        else:
            col = self.columns[j]
            in_l, c = col.in_level(l), col.cross_level(l)
            inp = self.get(SRC if in_l is None else (j, in_l))
            cross = self.get((j - 1, c)) if c is not None else None
            with torch.no_grad(), self.autocast_ctx():
                f = col.level_f(l, inp, cross, self.scales(j), self.hw)
        self.values[key] = self._unstep(j, l, self.get((j, l)), f)

    # ----------------------------------------------------------------- forward of one node
    def forward_node(self, j: int, l: int, inp: Tensor, cross: Optional[Tensor], prev: Optional[Tensor],
                     alpha: Optional[Tensor]) -> Tensor:
        """The update (j, l) without a graph, or, for :attr:`retained`, with F's graph retained
        for its backward (inputs detached, so the graph ends at them)."""
        col = self.columns[j]
        if (j, l) != self.retained:
            f = col.level_f(l, inp, cross, self.scales(j), self.hw)
            return col.step_from(f, prev, alpha)
        with torch.enable_grad():
            inp_ = inp.detach().requires_grad_(inp.requires_grad)
            cross_ = cross.detach().requires_grad_(cross.requires_grad) if cross is not None else None
            f = col.level_f(l, inp_, cross_, self.scales(j), self.hw)
        self.graphs[(j, l)] = (f, inp_, cross_)
        return col.step_from(f.detach(), prev, alpha)

    # ----------------------------------------------------------------- backward of one node
    def backward_node(self, j: int, l: int, g: Optional[Tensor], needs: Sequence[bool], params):
        """Gradients of node (j, l): (inp, cross, prev, alpha, *params); see the module docstring."""
        col = self.columns[j]
        in_l, c = col.in_level(l), col.cross_level(l)
        retained = self.graphs.pop((j, l), None)
        if retained is None:  # a retained graph holds its inputs: its node did not ask the buffer for them
            inp = self.take(SRC if in_l is None else (j, in_l))
            cross = self.take((j - 1, c)) if c is not None else None
        rebuild = col.has_prev and j > 0
        prev = self.take((-1, l)) if col.has_prev and j == 0 else None
        out = self.take((j, l)) if rebuild else None
        scales, hw = self.scales(j), self.hw
        need_inp, need_cross, need_prev, need_alpha = needs[3], needs[4], needs[5], needs[6]
        need_params = needs[7:]
        n_out = 4 + len(need_params)
        if g is None:  # nothing downstream uses this level: no gradient work
            if rebuild and self.uses.get((j - 1, l), 0) > 0:
                if retained is not None:
                    f = retained[0].detach()
                else:
                    with torch.no_grad(), self.autocast_ctx():
                        f = col.level_f(l, inp, cross, scales, hw)
                self.store((j - 1, l), self._unstep(j, l, out, f))
            return (None,) * n_out

        if retained is not None:
            f, inp_, cross_ = retained
        else:
            with torch.enable_grad():
                inp_ = inp.detach().requires_grad_(need_inp)
                cross_ = cross.detach().requires_grad_(need_cross) if cross is not None else None
                with self.autocast_ctx():
                    f = col.level_f(l, inp_, cross_, scales, hw)
        if rebuild:
            prev = self._unstep(j, l, out, f.detach())
            self.store((j - 1, l), prev)
        del out
        wrt = [t for t in (inp_, cross_) if t is not None and t.requires_grad]
        wrt += [p for p, need in zip(params, need_params) if need]
        grads = list(torch.autograd.grad(f, wrt, g, allow_unused=True)) if wrt else []
        del f
        g_inp = grads.pop(0) if inp_.requires_grad else None
        g_cross = grads.pop(0) if cross_ is not None and cross_.requires_grad else None
        g_params = [grads.pop(0) if need else None for need in need_params]
        g_prev = g_alpha = None
        if col.has_prev:
            alpha = self.alphas[(j, l)]
            if need_prev:
                g_prev = (g * alpha).to(prev.dtype)
            if need_alpha:
                g_alpha = (g * prev).sum(dim=tuple(range(g.ndim - 1))).to(alpha.dtype)
        return (g_inp if need_inp else None, g_cross if need_cross else None, g_prev, g_alpha, *g_params)

    def _unstep(self, j: int, l: int, out: Tensor, f: Tensor) -> Tensor:
        """c_l(j-1) = (c_l(j) - F) / alpha, in the dtype the forward produced for it."""
        with torch.no_grad():
            return self.columns[j].unstep(out, f, self.alphas[(j, l)]).to(self.dtypes[(j - 1, l)])


class _LevelStep(torch.autograd.Function):
    """One (column, level) update. Inputs: run, j, l, inp, cross, prev, alpha, *params."""

    @staticmethod
    def forward(ctx, run: RunBuffer, j: int, l: int, inp, cross, prev, alpha, *params):
        ctx.set_materialize_grads(False)
        ctx.run, ctx.j, ctx.l, ctx.params, ctx.done = run, j, l, params, False
        return run.forward_node(j, l, inp, cross, prev, alpha)

    @staticmethod
    def backward(ctx, g):
        if ctx.done:
            raise RuntimeError(
                "RevColV2 reversible engine: a second backward through the same graph is not supported "
                "(the rebuilt states are freed during the first one); run the forward again, or use "
                "reversible=False")
        ctx.done = True
        grads = ctx.run.backward_node(ctx.j, ctx.l, g, ctx.needs_input_grad, ctx.params)
        return (None, None, None, *grads)


def _level_params(column: nn.Module, l: int) -> List[Tensor]:
    return [p for p in column.levels[l].parameters() if p.requires_grad]


def run_reversible(
    columns: Sequence[nn.Module],
    source: Tensor,
    prev_state: Optional[State],
    drop_scales: Optional[Tensor],
    hw: Optional[Tuple[int, int]],
    counts: Sequence[int],
    retain_last_graph: bool = True,
) -> State:
    """Run ``columns`` with the reversible engine; returns the last column's state.

    Column ``j`` runs the first ``counts[j]`` levels of its update order
    (``revcolv2.plan.ColumnPlan.counts``); the levels not run come back as ``None``.
    ``drop_scales`` (columns, B, blocks per column, 2) or None (drop path off). Activation
    memory is O(1) in the number of columns, plus the graph of the run's last update until
    its backward when it is retained (``retain_last_graph`` and no gradient held by that
    level's parameters; see the module docstring).
    """
    ran = [j for j, k in enumerate(counts) if k > 0]
    retained = None
    if ran and retain_last_graph:
        j, l = ran[-1], columns[ran[-1]].order[counts[ran[-1]] - 1]
        # only while the backward still has to allocate the level's gradients (module docstring)
        if all(p.grad is None for p in _level_params(columns[j], l)):
            retained = (j, l)
    run = RunBuffer(columns, drop_scales, hw, source.device.type, retained=retained)
    n = len(columns[0].levels)
    if columns[0].has_prev != (prev_state is not None):
        raise RuntimeError("run_reversible: the first column's has_prev does not match prev_state")
    state: List[Optional[Tensor]] = list(prev_state) if prev_state is not None else [None] * n
    newest: Dict[int, Tuple[Tuple[int, int], Tensor]] = {
        l: ((-1, l), t) for l, t in enumerate(state) if t is not None
    }
    if prev_state is not None:
        for l, t in enumerate(state):
            if t is not None:
                run.dtypes[(-1, l)] = t.dtype
    for j, col in enumerate(columns):
        new: List[Optional[Tensor]] = [None] * n
        alphas = col.alpha_values() if col.has_prev and counts[j] else None  # (L, D), once per column
        for l in col.order[: counts[j]]:
            in_l, c = col.in_level(l), col.cross_level(l)
            inp = source if in_l is None else new[in_l]
            cross = state[c] if c is not None else None
            prev = state[l] if col.has_prev else None
            if (cross is None and c is not None) or (prev is None and col.has_prev):
                raise RuntimeError(f"column {j} level {l}: its input from the previous column was not computed")
            alpha = alphas[l] if alphas is not None else None
            if alpha is not None:
                run.alphas[(j, l)] = alpha.detach()
            # what this node's backward will read (a retained graph holds its own inputs)
            if (j, l) != retained:
                run.expect(SRC if in_l is None else (j, in_l))
                if c is not None:
                    run.expect((j - 1, c))
            if col.has_prev:
                run.expect((-1, l) if j == 0 else (j, l))
            out = _LevelStep.apply(run, j, l, inp, cross, prev, alpha, *_level_params(col, l))
            run.dtypes[(j, l)] = out.dtype
            new[l] = out
            newest[l] = ((j, l), out)
        state = new
    run.store(SRC, source)
    for l, t in enumerate(prev_state or ()):
        if t is not None:
            run.store((-1, l), t)
    for key, t in newest.values():
        run.store(key, t)
    return tuple(state)
