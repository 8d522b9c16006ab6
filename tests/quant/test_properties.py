"""Property-based tests: quantizer math and recipe parsing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdistill.errors import QdistillError
from qdistill.quant import IntRange, fake_quantize
from qdistill.recipe import Recipe

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


@st.composite
def quantization_case(draw):
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    qrange = IntRange(bits, signed)
    values = torch.tensor(draw(st.lists(finite, min_size=1, max_size=64)), dtype=torch.float32)
    scale = torch.tensor(draw(st.floats(min_value=0.0009765625, max_value=8.0, width=32)))
    zero = 0 if signed else draw(st.integers(qrange.qmin, qrange.qmax))
    return qrange, values, scale, torch.tensor(zero, dtype=torch.int32)


@settings(max_examples=200, deadline=None)
@given(quantization_case())
def test_outputs_lie_on_the_integer_grid(case):
    qrange, values, scale, zero = case
    out = fake_quantize(values, scale, zero, qrange)
    integers = out / scale + zero.float()
    assert torch.allclose(integers, integers.round(), atol=1e-3)
    assert integers.round().min() >= qrange.qmin and integers.round().max() <= qrange.qmax


@settings(max_examples=200, deadline=None)
@given(quantization_case())
def test_quantizing_twice_equals_once(case):
    qrange, values, scale, zero = case
    once = fake_quantize(values, scale, zero, qrange)
    torch.testing.assert_close(fake_quantize(once, scale, zero, qrange), once, atol=0, rtol=0)


@settings(max_examples=200, deadline=None)
@given(quantization_case())
def test_clamps_at_the_range_ends(case):
    qrange, values, scale, zero = case
    low = (qrange.qmin - zero.item()) * scale.item()
    high = (qrange.qmax - zero.item()) * scale.item()
    far = torch.tensor([low - 100.0 * scale.item() - 1.0, high + 100.0 * scale.item() + 1.0])
    out = fake_quantize(far, scale, zero, qrange)
    assert out[0].item() == pytest.approx(low, rel=1e-6, abs=1e-6)
    assert out[1].item() == pytest.approx(high, rel=1e-6, abs=1e-6)
    inside = fake_quantize(values, scale, zero, qrange)
    assert inside.min() >= low - 1e-4 and inside.max() <= high + 1e-4


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 300), st.floats(allow_nan=True), st.text(max_size=8))
keys = st.sampled_from(["model", "student", "data", "quant", "distill", "train", "teacher_train", "export", "name",
                        "weight_bits", "act_bits", "epochs", "lr", "alpha", "temperature", "features", "overrides",
                        "batch_size", "granularity", "init", "bogus"])
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_random_recipes_validate_or_raise_qdistill_error(document):
    try:
        recipe = Recipe.from_dict(document)
    except QdistillError as error:
        assert "\n" not in str(error)
    else:
        assert Recipe.from_dict(recipe.to_dict()) == recipe
