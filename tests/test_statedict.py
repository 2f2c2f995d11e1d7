import pytest
import torch

from mergeflow import StateDictMismatchError
from mergeflow.statedict import add, check_same_layout, difference, layout_of, mean, scale, total


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


def test_missing_key_is_named():
    a = {"visual.proj": torch.zeros(2, 2), "visual.ln_post.weight": torch.zeros(2)}
    b = {"visual.proj": torch.zeros(2, 2)}
    with pytest.raises(StateDictMismatchError, match=r"'visual\.ln_post\.weight'.*missing"):
        mean([a, b])


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
    three = layout_of({k: torch.zeros(1) for k in ("x", "y", "z")})
    with pytest.raises(StateDictMismatchError) as few:
        check_same_layout(three, {}, "A", "B")
    assert str(few.value) == "key 'x', 'y', 'z' of A is missing from B"
