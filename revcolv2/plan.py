"""Which levels each column of a RevColV2 runs: the static wiring and the plan built on it.

The wiring of the columns lives here and only here: :func:`update_order` (levels 0 -> L-1
in a bottom-up column, L-1 -> 0 in a top-down one), :func:`in_level` (which level of the
same column feeds level ``l``; None: the source tokens) and :func:`cross_level` (which
level of the previous column is fused into it). ``revcolv2.model.Column`` and the
reversible engine ask these functions; :class:`ColumnPlan` applies them to the whole model.

A :class:`ColumnPlan` holds how many levels each column builds (a prefix of its update
order: the levels no output reads are pruned) and answers every question that follows
from it: the levels a forward must run for the outputs it returns (:meth:`ColumnPlan.counts`),
the parameter prefixes of the pruned levels (checkpoint filtering, loading, export), the
column whose value of each level is the newest (``feature_info``), and the columns at
which a forward must stop to return them (the reversible engine returns only the last
column of a run).
"""
import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

Run = Tuple[List[int], List[int]]  # (levels each column runs, the columns whose states are returned)


def update_order(direction: str, num_levels: int) -> List[int]:
    """Levels in update order: 0 -> L-1 for 'up' (BU), L-1 -> 0 for 'down' (TD)."""
    return list(range(num_levels)) if direction == "up" else list(range(num_levels - 1, -1, -1))


def in_level(order: List[int], l: int) -> Optional[int]:
    """Level of the same column that feeds level ``l`` (the one before it in ``order``);
    None for the first level, which reads the source tokens."""
    i = order.index(l)
    return None if i == 0 else order[i - 1]


def cross_level(direction: str, l: int, num_levels: int, has_prev: bool) -> Optional[int]:
    """Level of the previous column fused into level ``l`` (above for BU, below for TD);
    None in a column without a previous one, or past the top / bottom level."""
    c = l + 1 if direction == "up" else l - 1
    return c if has_prev and 0 <= c < num_levels else None


def resolve_out_levels(out_levels: Union[str, Sequence[int]], num_levels: int) -> Tuple[int, ...]:
    """'top' -> (L-1,), 'all' -> (0..L-1), or the given levels, checked and sorted."""
    if isinstance(out_levels, str):
        if out_levels not in ("top", "all"):
            raise ValueError(f"out_levels must be 'top', 'all' or a sequence of levels, got {out_levels!r}")
        return (num_levels - 1,) if out_levels == "top" else tuple(range(num_levels))
    levels = tuple(sorted({int(l) for l in out_levels}))
    if not levels or levels[0] < 0 or levels[-1] >= num_levels:
        raise ValueError(f"out_levels must name at least one level in 0..{num_levels - 1}, got {tuple(out_levels)}")
    return levels


@dataclasses.dataclass(frozen=True)
class ColumnPlan:
    """The columns of a model (``num_bu_columns`` bottom-up, then ``num_td_columns`` top-down,
    ``num_levels`` levels each) and the levels each builds: ``built[j]`` is a prefix length of
    column j's update order."""

    num_levels: int
    num_bu_columns: int
    num_td_columns: int
    built: Tuple[int, ...]

    @classmethod
    def full(cls, num_levels: int, num_bu_columns: int, num_td_columns: int) -> "ColumnPlan":
        """Every level of every column built."""
        return cls(num_levels, num_bu_columns, num_td_columns, (num_levels,) * (num_bu_columns + num_td_columns))

    # ----------------------------------------------------------------- wiring of column j
    @property
    def num_columns(self) -> int:
        return self.num_bu_columns + self.num_td_columns

    def direction(self, j: int) -> str:
        return "up" if j < self.num_bu_columns else "down"

    def order(self, j: int) -> List[int]:
        return update_order(self.direction(j), self.num_levels)

    def cross_level(self, j: int, l: int) -> Optional[int]:
        return cross_level(self.direction(j), l, self.num_levels, has_prev=j > 0)

    def built_levels(self, j: int) -> List[int]:
        """The levels column ``j`` builds, in update order."""
        return self.order(j)[: self.built[j]]

    # ----------------------------------------------------------------- what a forward runs
    def counts(self, wanted: Dict[int, Iterable[int]]) -> List[int]:
        """How many levels (a prefix of its update order) each column must run so that the
        levels ``wanted[j]`` of every column ``j`` are computed.

        A level needs the levels before it in its column's order (its ``in`` chain) and, from
        the previous column, its own level (``alpha * prev``) and its ``cross`` level.
        """
        counts = [0] * self.num_columns
        want: set = set()
        for j in range(self.num_columns - 1, -1, -1):
            want |= set(wanted.get(j, ()))
            bad = sorted(l for l in want if not 0 <= l < self.num_levels)
            if bad:
                raise ValueError(f"levels {bad} out of range for columns with {self.num_levels} levels")
            order = self.order(j)
            k = max((order.index(l) + 1 for l in want), default=0)
            counts[j] = k
            want = set()
            if j > 0:
                for l in order[:k]:
                    want.add(l)
                    c = self.cross_level(j, l)
                    if c is not None:
                        want.add(c)
        return counts

    def _run_of(self, wanted: Dict[int, List[int]]) -> Run:
        """The counts for ``wanted`` and the columns a forward returns: those with wanted
        levels and the last BU column, where a run of the reversible engine always ends (the
        TD columns run with the BU state as their external previous state)."""
        ends = sorted(set(j for j, levels in wanted.items() if levels) | {self.num_bu_columns - 1})
        return self.counts(wanted), ends

    def newest_columns(self, counts: Optional[Sequence[int]] = None) -> List[int]:
        """For each level, the last column that computes it (``counts``: levels each column
        runs; default: those it builds): where the level's newest value comes from."""
        counts = self.built if counts is None else counts
        return [max(j for j in range(self.num_columns) if l in self.order(j)[: counts[j]])
                for l in range(self.num_levels)]

    def newest_run(self, last_count: Optional[int] = None) -> Run:
        """The run that returns the newest value of every level: every column runs what it
        builds, the last one at most ``last_count`` levels (``stop_early``)."""
        counts = list(self.built)
        if last_count is not None:
            counts[-1] = min(counts[-1], last_count)
        wanted: Dict[int, List[int]] = {}
        for l, j in enumerate(self.newest_columns(counts)):
            wanted.setdefault(j, []).append(l)
        return self._run_of(wanted)

    def columns_run(self, td_levels: Optional[Sequence[int]] = None) -> Run:
        """The run that returns the last BU state (every level) and the levels ``td_levels``
        of the last TD column (None: every level it builds; ``()``: no TD column runs)."""
        last = self.num_columns - 1
        wanted = {self.num_bu_columns - 1: list(range(self.num_levels))}
        if self.num_td_columns:
            wanted[last] = list(self.built_levels(last) if td_levels is None else td_levels)
        return self._run_of(wanted)

    def stop_early_count(self, levels: Iterable[int]) -> int:
        """Levels the last column must run (its update order) to compute those of ``levels``
        that it builds."""
        last = self.num_columns - 1
        order, built = self.order(last), self.built_levels(last)
        return max((order.index(l) + 1 for l in levels if l in built), default=0)

    def check_built(self, levels: Iterable[int]) -> None:
        """``ValueError`` unless the last column builds every one of ``levels``."""
        levels, built = set(levels), self.built_levels(self.num_columns - 1)
        missing = sorted(levels - set(built))
        if missing:
            raise ValueError(
                f"levels {missing} of the last column are not built in this model (it builds {sorted(built)}): "
                f"build it with out_levels='all' or {sorted(levels)} to read them")

    # ----------------------------------------------------------------- pruning
    def pruned(self, out_levels: Sequence[int]) -> "ColumnPlan":
        """The plan that builds only what the levels ``out_levels`` of the last column depend
        on. BU columns keep every level (the linear probe reads the last one); a model
        without TD columns keeps everything (its top level needs every level). Pruning only
        removes: asking for a level already pruned is a ``ValueError``."""
        if not self.num_td_columns:
            return self
        self.check_built(out_levels)
        counts = self.counts({self.num_bu_columns - 1: range(self.num_levels), self.num_columns - 1: out_levels})
        return dataclasses.replace(self, built=tuple(counts))

    def pruned_levels(self) -> List[Tuple[int, int]]:
        """(column, level) pairs that are not built."""
        return sorted((j, l) for j in range(self.num_columns) for l in self.order(j)[self.built[j]:])

    def pruned_prefixes(self) -> Tuple[str, ...]:
        """Parameter-name prefixes of the levels not built; a checkpoint of the full model has
        tensors there that a model built by this plan leaves out."""
        return tuple(f"columns.{j}.levels.{l}." for j, l in self.pruned_levels())
