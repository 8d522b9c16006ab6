"""Mixed-precision allocation: one option per group (a layer's weight width, its activation width)
minimising the summed cost (sensitivity) with the summed size within a budget.

This is a multiple-choice knapsack, solved exactly as a small integer program with
``scipy.optimize.milp`` (HiGHS branch and bound): binary ``x[g, o]`` is 1 when group ``g`` takes
option ``o``; each group takes exactly one option; ``sum(size * x) <= budget``; minimise
``sum(cost * x)``. With tens of layers and three widths each it solves in milliseconds, and unlike
a greedy pass it never misses a better combination (tests check it against enumerating every one).

Example (two layers; the budget forbids 8 bits on both, so the less sensitive one gives way):
    >>> groups = {"conv": {2: (0.9, 2), 8: (0.0, 8)}, "fc": {2: (0.1, 20), 8: (0.0, 80)}}
    >>> allocate(groups, budget=30)
    {'conv': 8, 'fc': 2}
    >>> smallest_size(groups)
    22.0
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qdistill.errors import RecipeError

Options = Mapping[Hashable, tuple[float, float]]  # option -> (cost, size)


def smallest_size(groups: Mapping[str, Options]) -> float:
    """The smallest summed size any allocation can have (each group at its smallest option)."""
    return float(sum(min(size for _, size in options.values()) for options in groups.values()))


def allocate(groups: Mapping[str, Options], budget: float, what: str = "budget") -> dict[str, Hashable]:
    """``{group: option}`` with the least summed cost whose summed size is at most ``budget``.

    ``groups`` maps each group to its options, each ``option: (cost, size)``. Among allocations of
    equal cost the solver's choice stands (any of them is optimal). A budget below
    ``smallest_size`` is a ``RecipeError`` naming ``what`` and the smallest size possible.
    """
    if not groups or any(not options for options in groups.values()):
        raise RecipeError(f"{what}: nothing to allocate; every group needs at least one option")
    if budget < smallest_size(groups):
        raise RecipeError(f"{what}: {budget:g} is below the smallest size the allowed widths reach "
                          f"({smallest_size(groups):g}); allowed: at least that")
    keys = [(group, option) for group, options in groups.items() for option in options]
    costs = np.array([groups[group][option][0] for group, option in keys], dtype=float)
    sizes = np.array([groups[group][option][1] for group, option in keys], dtype=float)
    one_each = np.array([[1.0 if group == name else 0.0 for group, _ in keys] for name in groups])
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(sizes[None, :], -np.inf, float(budget))]
    solved = milp(costs, constraints=constraints, integrality=np.ones(len(keys)), bounds=Bounds(0, 1))
    if not solved.success:  # cannot happen once the budget is feasible; say what the solver said if it does
        raise RecipeError(f"{what}: the integer program found no allocation within {budget:g} ({solved.message})")
    return {group: option for (group, option), taken in zip(keys, solved.x, strict=True) if taken > 0.5}
