"""Per-layer bit allocation: a multiple-choice knapsack.

Each layer takes exactly one choice (a bit width or float); a choice has a cost (bytes of
the objective) and a divergence (the measured effect of that layer alone at that choice on
the output). ``allocate`` minimises the total cost subject to the summed divergence staying
within a budget: an exact integer program (scipy's HiGHS ``milp``), with a greedy fallback
when the solver is unavailable or fails. Summing single-layer divergences is the usual
first-order model of how errors add up (HAWQ, ZeroQ); the end-to-end runs that follow are
what decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class ChoiceTable:
    """Per layer (rows) and choice (columns): divergence and cost; NaN marks an unavailable choice."""

    layers: list[str]
    choices: list[str]
    divergence: np.ndarray
    cost: np.ndarray

    def total(self, picks: list[int]) -> tuple[float, float]:
        """(summed divergence, summed cost) of one choice per layer."""
        rows = np.arange(len(self.layers))
        return float(self.divergence[rows, picks].sum()), float(self.cost[rows, picks].sum())


def allocate(table: ChoiceTable, max_divergence: float) -> list[int] | None:
    """The cheapest choice per layer whose summed divergence is at most ``max_divergence``.

    Returns:
        One choice index per layer, or None when even the least divergent choices exceed the budget.
    """
    div = np.where(np.isfinite(table.divergence), np.maximum(table.divergence, 0.0), np.nan)
    cost = table.cost
    ok = np.isfinite(div) & np.isfinite(cost)
    if not ok.any(axis=1).all():
        missing = [table.layers[i] for i in np.flatnonzero(~ok.any(axis=1))]
        raise ValueError(f"layers without any available choice: {missing}")
    floor = float(np.nansum(np.where(ok, div, np.inf).min(axis=1)))
    if floor > max_divergence * (1 + 1e-9) + 1e-15:
        return None
    try:
        picks = _milp(div, cost, ok, max_divergence)
    except Exception as err:  # the greedy answer is still a valid allocation
        log.warning("integer program failed (%s); using the greedy allocation", err)
        picks = None
    return picks if picks is not None else _greedy(div, cost, ok, max_divergence)


def _milp(div: np.ndarray, cost: np.ndarray, ok: np.ndarray, budget: float) -> list[int] | None:
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_layers, n_choices = div.shape
    d = np.where(ok, div, 0.0).ravel()
    c = np.where(ok, cost, 0.0).ravel()
    # Among equally cheap allocations prefer the least divergent: a tie-break far below a byte.
    scale = d.max() if d.max() > 0 else 1.0
    objective = c + 1e-3 * d / scale
    one_each = np.zeros((n_layers, n_layers * n_choices))
    for i in range(n_layers):
        one_each[i, i * n_choices : (i + 1) * n_choices] = 1
    constraints = [
        LinearConstraint(one_each, 1, 1),
        # A relative slack so an allocation that sums exactly to the budget is not lost to rounding.
        LinearConstraint(d[None, :], -np.inf, budget * (1 + 1e-9) + 1e-15),
    ]
    upper = ok.ravel().astype(float)
    res = milp(objective, constraints=constraints, integrality=np.ones_like(objective), bounds=Bounds(0, upper))
    if not res.success or res.x is None:
        return None
    x = np.rint(res.x).reshape(n_layers, n_choices)
    return [int(np.argmax(row)) for row in x]


def _greedy(div: np.ndarray, cost: np.ndarray, ok: np.ndarray, budget: float) -> list[int]:
    """Start from the least divergent choice per layer; repeatedly take the move that saves the
    most bytes per unit of added divergence while the budget allows."""
    d = np.where(ok, div, np.inf)
    c = np.where(ok, cost, np.inf)
    picks = [int(np.argmin(row)) for row in d]
    used = float(sum(d[i, p] for i, p in enumerate(picks)))
    while True:
        best, best_ratio = None, -1.0
        for i, p in enumerate(picks):
            for j in range(d.shape[1]):
                saved, added = c[i, p] - c[i, j], d[i, j] - d[i, p]
                if not np.isfinite(saved) or saved <= 0 or used + added > budget * (1 + 1e-9) + 1e-15:
                    continue
                ratio = saved / max(added, 1e-18)
                if ratio > best_ratio:
                    best, best_ratio = (i, j, added), ratio
        if best is None:
            return picks
        i, j, added = best
        picks[i] = j
        used += added
