"""The allocation is the exact optimum: checked against enumerating every combination."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdistill.errors import RecipeError
from qdistill.quant.allocate import allocate, smallest_size


def _brute_force(groups, budget):
    """The least total cost over every combination within the budget (the independent reference)."""
    names = list(groups)
    best = None
    for combo in itertools.product(*(groups[name].items() for name in names)):
        size = sum(size for _, (_, size) in combo)
        cost = sum(cost for _, (cost, _) in combo)
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


_options = st.dictionaries(st.sampled_from([2, 3, 4, 8]),
                           st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 200)), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(groups=st.dictionaries(st.sampled_from(list("abcdef")), _options, min_size=1, max_size=5),
       slack=st.floats(0, 1))
def test_allocation_is_optimal_and_within_budget(groups, slack):
    low = smallest_size(groups)
    high = sum(max(size for _, size in options.values()) for options in groups.values())
    budget = low + slack * (high - low)
    chosen = allocate(groups, budget)
    assert set(chosen) == set(groups) and all(chosen[name] in groups[name] for name in groups)
    assert sum(groups[name][chosen[name]][1] for name in groups) <= budget + 1e-9
    assert sum(groups[name][chosen[name]][0] for name in groups) == pytest.approx(_brute_force(groups, budget), abs=1e-6)


def test_greedy_would_miss_the_optimum():
    # greedy by cost saved per byte upgrades "b" first (2.0 per byte against 1.0), then cannot afford "a";
    # the optimum (cost 2 against 10) upgrades "a" alone
    groups = {"a": {2: (10.0, 0), 8: (0.0, 10)}, "b": {2: (2.0, 0), 8: (0.0, 1)}}
    assert allocate(groups, budget=10) == {"a": 8, "b": 2}


def test_budget_below_the_smallest_size_is_a_one_line_error():
    with pytest.raises(RecipeError, match=r"search.budget.size_bytes: 3 is below the smallest size .* \(5\)"):
        allocate({"a": {2: (1.0, 5), 8: (0.0, 20)}}, budget=3, what="search.budget.size_bytes")
