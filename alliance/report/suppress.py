"""Small-cell suppression for clinic reports: primary and secondary (complementary) suppression.

Pure functions, no I/O. A *cell* is any published count or rate; its *base* is the number of
patients it rests on. Rules (documented in docs/reports.md):

- Primary: a cell whose base is below ``min_cell`` is suppressed. A count of patients is its own
  base; a rate's base is its denominator (and, with ``protect_numerators``, also its numerator,
  since rate x n gives the count back). A zero count is not suppressed: it rests on nobody.
- Secondary: cells that add up to a published total form a *group*. A group with exactly one
  suppressed cell would give that cell back by subtraction, so the smallest other cell of the group
  (by base, non-zero preferred) is suppressed too. Groups may overlap (a histogram's bins sum to
  the sessions total and, below the cutoff, to the concern count); the rule is applied until no
  group has exactly one suppressed cell. When a group has no other cell to give, the group's
  total itself must be suppressed and :func:`suppress_groups` reports it.

Why not an optimal (linear programming) suppression: report tables here are one-dimensional or
nested, where "at least two suppressed per published sum" prevents exact recovery; it is simple
enough for a clinic lead to check by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_MIN_CELL = 11

PRIMARY = "primary"
SECONDARY = "secondary"


@dataclass(frozen=True)
class Shown:
    """A value ready to print: either the value, or suppressed with the reason kept for audit."""

    value: float | int | None
    base: int
    suppressed: str | None = None  # None, "primary" or "secondary"

    @property
    def is_suppressed(self) -> bool:
        return self.suppressed is not None

    @property
    def shown(self) -> float | int | None:
        """The value, or None when suppressed (templates print the suppression marker)."""
        return None if self.suppressed else self.value


def is_small(base: int | None, min_cell: int) -> bool:
    """Whether a count of `base` patients is a small cell (1 .. min_cell - 1)."""
    return base is not None and 0 < base < min_cell


def suppress_groups(
    bases: Sequence[int],
    groups: Sequence[Sequence[int]],
    min_cell: int = DEFAULT_MIN_CELL,
    primary: Sequence[bool] | None = None,
    linked: Sequence[tuple[int, int]] = (),
) -> tuple[list[str | None], list[bool]]:
    """Return each cell's suppression reason and, per group, whether its total must be hidden.

    bases: patients behind each cell. groups: index lists of cells that sum to a published figure
    (or to a sum of other cells: a linear relation with one unknown gives that unknown back just
    the same). primary: optional precomputed primary flags (default: ``is_small(base)``).
    linked: pairs (i, j): when cell i is hidden, cell j is hidden too (a rate whose count is
    hidden cannot stay visible without giving the count back, or vice versa).
    """
    n = len(bases)
    reasons: list[str | None] = [None] * n
    for i in range(n):
        small = primary[i] if primary is not None else is_small(bases[i], min_cell)
        if small:
            reasons[i] = PRIMARY
    hide_total = [False] * len(groups)
    changed = True
    while changed:
        changed = False
        for i, j in linked:
            if reasons[i] and not reasons[j]:
                reasons[j] = SECONDARY
                changed = True
        # Smallest groups first: a complement chosen there often protects the larger ones too.
        for g in sorted(range(len(groups)), key=lambda g: (len(groups[g]), g)):
            members = groups[g]
            hidden = [i for i in members if reasons[i]]
            if len(hidden) != 1:
                continue
            candidates = [i for i in members if not reasons[i]]
            if not candidates:
                # Only the total could give the cell away: it has to go.
                hide_total[g] = True
                continue
            # A zero as complement still leaves the sum ambiguous, but a non-zero one is safer
            # against readers who know primary cells are never zero.
            nonzero = [i for i in candidates if bases[i] > 0]
            pick = min(nonzero or candidates, key=lambda i: (bases[i], i))
            reasons[pick] = SECONDARY
            changed = True
    return reasons, hide_total


def suppress_rate(
    numerator: int | None,
    denominator: int | None,
    min_cell: int = DEFAULT_MIN_CELL,
    protect_numerators: bool = False,
) -> Shown:
    """A percentage numerator/denominator, suppressed when it rests on too few patients."""
    if not denominator:
        return Shown(None, 0)
    value = 100.0 * (numerator or 0) / denominator
    small = denominator < min_cell or (
        protect_numerators
        and (is_small(numerator, min_cell) or is_small(denominator - (numerator or 0), min_cell))
    )
    return Shown(value, denominator, PRIMARY if small else None)


def suppress_value(value: float | int | None, base: int | None, min_cell: int = DEFAULT_MIN_CELL) -> Shown:
    """A statistic (mean, correlation, effect size) over `base` patients."""
    base = int(base or 0)
    if value is None:
        return Shown(None, base)
    return Shown(value, base, PRIMARY if base < min_cell else None)


def suppress_categories(
    counts: Mapping[str, int],
    min_cell: int = DEFAULT_MIN_CELL,
) -> tuple[dict[str, Shown], Shown, dict[str, Shown]]:
    """Counts per category summing to a shown total: (counts, total, percentages), all suppressed safely.

    A total below min_cell hides everything. Percentages follow their counts (pct x total = count).
    """
    names = list(counts)
    bases = [int(counts[k] or 0) for k in names]
    total = sum(bases)
    if total < min_cell:
        hidden = {k: Shown(b, b, PRIMARY) for k, b in zip(names, bases, strict=True)}
        pct = {k: Shown(None, total, PRIMARY) for k in names}
        return hidden, Shown(total, total, PRIMARY if total else None), pct
    reasons, hide_total = suppress_groups(bases, [list(range(len(names)))], min_cell)
    shown = {k: Shown(b, b, r) for k, b, r in zip(names, bases, reasons, strict=True)}
    pct = {
        k: Shown(100.0 * b / total, total, r) for k, b, r in zip(names, bases, reasons, strict=True)
    }
    return shown, Shown(total, total, PRIMARY if hide_total[0] else None), pct


def suppress_rows(
    row_bases: Sequence[int],
    min_cell: int = DEFAULT_MIN_CELL,
    total_shown: bool = True,
) -> tuple[list[str | None], bool]:
    """Row-level suppression for a table whose additive columns sum to a shown total row.

    Used by the therapists table: a therapist with fewer than min_cell patients has the whole row
    hidden; if exactly one row is hidden, the next smallest row is hidden too, so the hidden row
    cannot be recovered as total minus the others. Returns (reason per row, hide total row).
    """
    groups = [list(range(len(row_bases)))] if total_shown else []
    return suppress_groups(list(row_bases), groups, min_cell)


def recoverable(relations: Sequence[Mapping[int, float]], hidden: set[int]) -> list[int]:
    """Hidden cells whose exact value follows from the relations and the shown cells.

    relations: linear equations between cells (cell index -> coefficient, each summing to 0; a
    shown total is a cell too). A hidden cell is recoverable when its unit vector lies in the row
    space of the relations restricted to the hidden cells (linear algebra, exact up to rounding).
    """
    import numpy as np

    cols = sorted(hidden)
    if not cols or not relations:
        return []
    a = np.array([[float(r.get(c, 0.0)) for c in cols] for r in relations])
    rank = np.linalg.matrix_rank(a)
    out = []
    for k, c in enumerate(cols):
        unit = np.zeros((1, len(cols)))
        unit[0, k] = 1.0
        if np.linalg.matrix_rank(np.vstack([a, unit])) == rank:
            out.append(c)
    return out


def suppress_relations(
    bases: Sequence[int],
    relations: Sequence[Mapping[int, float]],
    reasons: Sequence[str | None],
    linked: Sequence[tuple[int, int]] = (),
    last_resort: Sequence[int] = (),
) -> list[str | None]:
    """Hide further cells until no hidden cell can be worked out from the relations (secondary).

    Complements `suppress_groups` where tables are tied by relations across them (one table's
    cells sum to a combination of another's): for a recoverable cell, the smallest shown non-zero
    cell of a relation containing it is hidden too; `last_resort` cells (published totals) only
    when nothing else is left. linked: (i, j) pairs, j hidden whenever i is.
    """
    out = list(reasons)
    for _ in range(len(out) + 1):
        for i, j in linked:
            if out[i] and not out[j]:
                out[j] = SECONDARY
        rec = recoverable(relations, {i for i, r in enumerate(out) if r})
        if not rec:
            return out
        cell = rec[0]
        cands = {i for r in relations if r.get(cell) for i in r if not out[i] and i != cell}
        pick = ([i for i in cands if i not in last_resort and bases[i] > 0]
                or [i for i in cands if i not in last_resort] or list(cands))
        if not pick:  # nothing left to hide: cannot happen when totals are cells too
            return out
        out[min(pick, key=lambda i: (bases[i], i))] = SECONDARY
    return out
