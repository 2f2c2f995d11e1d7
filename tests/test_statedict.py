import pytest
import torch

from mergeflow import StateDictMismatchError
from mergeflow.statedict import (
    add,
    check_same_layout,
    difference,
    layout_of,
    mean,
    mean_of,
    scale,
    total,
)


def _sd(**tensors):
    return dict(tensors)


def test_algebra_matches_elementwise_arithmetic():
    a = _sd(w=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), b=torch.tensor([0.5, -1.0]))
    b = _sd(w=torch.tensor([[0.0, 1.0], [1.0, 0.0]]), b=torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(difference(a, b)["w"], torch.tensor([[1.0, 1.0], [2.0, 4.0]]))
    torch.testing.assert_close(add(a, b)["b"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(scale(a, -2.0)["b"], torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(total([a, b, a])["b"], torch.tensor([2.5, -1.0]))
    torch.testing.assert_close(mean([a, b])["w"], torch.tensor([[0.5, 1.5], [2.0, 2.0]]))


def test_task_vector_round_trip(family):
    base, (tuned, *_) = family
    rebuilt = add(base, difference(tuned, base))
    for key in base:
        torch.testing.assert_close(rebuilt[key], tuned[key])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype_and_computes_in_fp32(dtype):
    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(64, 64, generator=gen).to(dtype)} for _ in range(5)]
    out = mean(states)["w"]
    expected = torch.stack([s["w"].float() for s in states]).mean(0).to(dtype)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_integer_buffers_are_carried_from_the_first_operand():
    a = {"w": torch.ones(2), "steps": torch.tensor(7)}
    b = {"w": torch.zeros(2), "steps": torch.tensor(9)}
    out = mean([a, b])
    assert out["steps"].item() == 7 and out["steps"].dtype == torch.int64


def test_integer_buffers_before_float_tensors_leave_them_combined():
    a = {"steps": torch.tensor(7), "w": torch.ones(2), "v": torch.full((2,), 3.0)}
    b = {"steps": torch.tensor(9), "w": torch.zeros(2), "v": torch.ones(2)}
    out = mean([a, b])
    assert list(out) == ["steps", "w", "v"]
    torch.testing.assert_close(out["w"], torch.full((2,), 0.5))
    torch.testing.assert_close(out["v"], torch.full((2,), 2.0))


def test_mean_of_equal_tensors_is_that_tensor_and_of_others_the_mean():
    x = torch.tensor([0.1, 0.7, 1e-8])
    assert torch.equal(mean_of([x, x.clone(), x.clone()]), x)
    # the first two equal, the third not: a mean, not the first tensor
    torch.testing.assert_close(mean_of([x, x.clone(), x + 3]), x + 1)
    torch.testing.assert_close(mean_of([x + 3, x, x.clone()]), x + 1)
    torch.testing.assert_close(mean_of([x, x + 3, x.clone()]), x + 1)


def test_missing_key_is_named():
    a = {"visual.proj": torch.zeros(2, 2), "visual.ln_post.weight": torch.zeros(2)}
    b = {"visual.proj": torch.zeros(2, 2)}
    with pytest.raises(StateDictMismatchError) as refused:
        mean([a, b])
    assert str(refused.value) == (
        "key 'visual.ln_post.weight' of state dict 0 is missing from state dict 1"
    )


def test_the_operand_at_fault_is_named_by_its_position():
    good = {"w": torch.zeros(2)}
    with pytest.raises(
        StateDictMismatchError, match="of state dict 0 is missing from state dict 2"
    ):
        total([good, good, {}])
    with pytest.raises(StateDictMismatchError, match="^no state dicts given$"):
        total([])


def test_layouts_compared_without_names_say_reference_and_other():
    with pytest.raises(StateDictMismatchError) as refused:
        check_same_layout(layout_of({"w": torch.zeros(1)}), {})
    assert str(refused.value) == "key 'w' of reference is missing from other"


def test_extra_key_is_named():
    a = {"visual.proj": torch.zeros(2, 2)}
    b = {"visual.proj": torch.zeros(2, 2), "visual.extra": torch.zeros(1)}
    with pytest.raises(StateDictMismatchError, match=r"'visual\.extra'.*not in"):
        difference(a, b)


def test_shape_mismatch_is_named():
    a = {"blk.attn.in_proj_weight": torch.zeros(6, 2)}
    b = {"blk.attn.in_proj_weight": torch.zeros(2, 6)}
    with pytest.raises(
        StateDictMismatchError, match=r"'blk\.attn\.in_proj_weight'.*\(6, 2\).*\(2, 6\)"
    ):
        add(a, b)


def test_dtype_mismatch_is_named():
    a = {"w": torch.zeros(2, dtype=torch.float16)}
    b = {"w": torch.zeros(2, dtype=torch.float32)}
    with pytest.raises(StateDictMismatchError, match=r"'w'.*float16.*float32"):
        check_same_layout(layout_of(a), layout_of(b), "a.safetensors", "b.safetensors")


def test_missing_keys_are_named_three_at_a_time():
    five = layout_of({f"k{i}": torch.zeros(1) for i in range(5)})
    with pytest.raises(StateDictMismatchError) as many:
        check_same_layout(five, {}, "A", "B")
    assert str(many.value) == "key 'k0', 'k1', 'k2' and 2 more of A is missing from B"
    four = layout_of({f"k{i}": torch.zeros(1) for i in range(4)})
    with pytest.raises(StateDictMismatchError) as one_more:
        check_same_layout(four, {}, "A", "B")
    assert str(one_more.value) == "key 'k0', 'k1', 'k2' and 1 more of A is missing from B"
    three = layout_of({k: torch.zeros(1) for k in ("x", "y", "z")})
    with pytest.raises(StateDictMismatchError) as few:
        check_same_layout(three, {}, "A", "B")
    assert str(few.value) == "key 'x', 'y', 'z' of A is missing from B"
