"""Property and fuzz tests (hypothesis): the state-dict algebra, the streamed order
statistics, and the spec parser."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import order_statistics_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergeflow.errors import MergeflowError, StateDictMismatchError
from mergeflow.spec import MergeSpec
from mergeflow.statedict import add, difference, mean, scale

KEYS = st.text(alphabet="abcdefgh._", min_size=1, max_size=12)
SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
FLOATS = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def layouts(draw):
    keys = draw(st.lists(KEYS, min_size=1, max_size=5, unique=True))
    return {k: (draw(SHAPES), draw(DTYPES)) for k in keys}


def filled(layout, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen).to(dtype) for k, (shape, dtype) in layout.items()}


def tolerance(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**31 - 1))
def test_adding_a_difference_gives_back_the_other_state(layout, seed):
    a, b = filled(layout, seed), filled(layout, seed + 1)
    restored = add(a, difference(b, a))
    for key, (_, dtype) in layout.items():
        assert restored[key].dtype == dtype
        torch.testing.assert_close(
            restored[key].float(), b[key].float(), atol=8 * tolerance(dtype), rtol=tolerance(dtype)
        )


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_mean_is_order_free_and_fixes_identical_states(layout, seed, copies):
    states = [filled(layout, seed + i) for i in range(3)]
    forward, backward = mean(states), mean(states[::-1])
    for key, (_, dtype) in layout.items():
        torch.testing.assert_close(forward[key], backward[key], atol=tolerance(dtype), rtol=0)
    same = mean([states[0]] * copies)
    for key in layout:
        torch.testing.assert_close(same[key], states[0][key])


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(0, 2**31 - 1), FLOATS)
def test_scaling_is_multiplication_in_float32(layout, seed, factor):
    state = filled(layout, seed)
    scaled = scale(state, factor)
    for key, (_, dtype) in layout.items():
        expected = (state[key].float() * factor).to(dtype)
        torch.testing.assert_close(scaled[key], expected, equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(0, 2**31 - 1), st.data())
def test_a_layout_mismatch_names_the_key(layout, seed, data):
    a = filled(layout, seed)
    key = data.draw(st.sampled_from(sorted(layout)))
    b = dict(a)
    b[key] = torch.zeros(a[key].numel() + 1)
    with pytest.raises(StateDictMismatchError, match=repr(key).replace(".", r"\.")):
        difference(a, b)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=50),
        min_size=1,
        max_size=6,
    ),
    st.data(),
)
def test_streamed_order_statistics_equal_a_sort(chunks, data):
    tensors = [torch.tensor(c, dtype=torch.float32) for c in chunks]
    everything = torch.sort(torch.cat(tensors)).values
    ranks = data.draw(st.lists(st.integers(0, len(everything) - 1), min_size=1, max_size=4))
    for rank, value in zip(ranks, order_statistics_of(tensors, ranks), strict=True):
        expected = everything[rank].item()
        assert value == expected or (value == 0 and expected == 0)  # ±0 sort as equals


# --- the spec parser ----------------------------------------------------------------

VALID = {
    "model": "mergeflow-tiny-vit",
    "base": "s3://zoo/base.safetensors",
    "tasks": [
        {"name": "a", "checkpoint": "s3://zoo/a.safetensors", "dataset": {"uri": "s3://d/a"}},
        {"name": "b", "checkpoint": "s3://zoo/b.safetensors", "dataset": {"uri": "s3://d/b"}},
    ],
    "registered_model": "zoo",
}

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(
    [
        "model",
        "base",
        "tasks",
        "grid",
        "baselines",
        "registered_model",
        "device",
        "batch_size",
        "compression",
        "colour",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(FIELDS, JSONISH, max_size=4))
def test_any_document_parses_or_fails_with_a_named_field(changes):
    document = {**VALID, **changes}
    try:
        spec = MergeSpec.parse(document)
    except MergeflowError as exc:
        message = str(exc)
        assert message.startswith("spec: ") and len(message.splitlines()) == 1
        # what follows the prefix is the field at fault: a key of the document
        field = message.removeprefix("spec: ").split(":")[0].split(".")[0]
        assert field in document, message
    else:
        assert MergeSpec.parse(yaml.safe_load(spec.to_yaml())) == spec


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5),
    st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=4),
    st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),
)
def test_valid_grids_round_trip_through_yaml(ratios, scales, device):
    spec = MergeSpec.parse(
        {**VALID, "grid": {"rank_ratios": ratios, "scales": scales}, "device": device}
    )
    assert list(spec.grid.rank_ratios) == sorted(set(spec.grid.rank_ratios))
    assert all(0 < r <= 1 for r in spec.grid.rank_ratios)
    assert len(spec.grid.points()) == len(set(ratios)) * len(set(scales))
    assert MergeSpec.parse(yaml.safe_load(spec.to_yaml())) == spec
