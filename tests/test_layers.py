"""Per-layer recipes and layer swapping on a tiny real Llama and an open_clip tower."""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_like, tiny_tower_state

from mergeflow.architectures import layer_of
from mergeflow.checkpoints import StateDictReader
from mergeflow.errors import ParameterError
from mergeflow.merge import merge_readers


def merge(name, base, finetuned, **params):
    readers = [StateDictReader(s, f"m{i}") for i, s in enumerate(finetuned)]
    return merge_readers(name, readers, StateDictReader(base, "base"), params, device="cpu")


@pytest.fixture(scope="module")
def decoders():
    """A 6-layer Llama and three fine-tuned copies."""
    from formats import llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    base = LlamaForCausalLM(llama_config(num_hidden_layers=6)).state_dict()
    return base, finetune_like(base, num_tasks=3, seed=4)


def test_layer_swap_takes_outer_and_middle_layers_and_blends_between(decoders):
    base, tuned = decoders
    merged = merge("layer_swap", base, tuned, outer=0, middle=2, bottom=1, top=1,
                   transition_bottom=1, transition_top=1, other="middle")  # fmt: skip
    expected_source = {0: "outer", 1: "mix", 2: "middle", 3: "middle", 4: "mix", 5: "outer"}
    for key, value in merged.items():
        found = layer_of(key)
        kind = expected_source[found[1]] if found else "middle"
        want = {
            "outer": tuned[0][key],
            "middle": tuned[2][key],
            "mix": 0.5 * tuned[0][key] + 0.5 * tuned[2][key],
        }[kind]
        torch.testing.assert_close(value, want, msg=key)


def test_a_recipe_blends_per_range_and_names_what_is_wrong(decoders):
    base, tuned = decoders
    slices = [
        {"layers": [0, 3], "blend": {"0": 1}},
        {"layers": [3, 6], "blend": {"1": 0.25, "2": 0.5, "base": 0.25}},
    ]
    merged = merge("layer_recipe", base, tuned, slices=slices, other={"base": 1})
    key = "model.layers.4.mlp.up_proj.weight"
    want = 0.25 * tuned[1][key] + 0.5 * tuned[2][key] + 0.25 * base[key]
    torch.testing.assert_close(merged[key], want)
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"],
                               tuned[0]["model.layers.1.self_attn.q_proj.weight"])  # fmt: skip
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    with pytest.raises(ParameterError, match="layer 3 of model.layers is in no slice"):
        merge("layer_recipe", base, tuned, slices=slices[:1], other={"0": 1})
    with pytest.raises(ParameterError, match="the weights sum to 0.9, not 1"):
        merge("layer_recipe", base, tuned, slices=[{"layers": [0, 6], "blend": {"0": 0.9}}],
              other={"0": 1})  # fmt: skip
    with pytest.raises(ParameterError, match="parameter 'other'"):
        merge("layer_recipe", base, tuned, slices=slices)  # no source assumed for the rest
    with pytest.raises(ParameterError, match="more than the 6 the model has"):
        merge("layer_swap", base, tuned, outer=0, middle=1, bottom=4, top=3, other="outer")


def test_layers_of_an_open_clip_tower_come_from_their_model():
    base = tiny_tower_state(seed=5, width=32, layers=4)
    tuned = finetune_like(base, num_tasks=2, seed=6)
    merged = merge("layer_swap", base, tuned, outer=1, middle=0, bottom=1, top=1, other="base")
    key = "visual.transformer.resblocks.{}.attn.in_proj_weight"
    torch.testing.assert_close(merged[key.format(0)], tuned[1][key.format(0)])
    torch.testing.assert_close(merged[key.format(2)], tuned[0][key.format(2)])
    torch.testing.assert_close(merged[key.format(3)], tuned[1][key.format(3)])
    assert torch.equal(merged["visual.proj"], base["visual.proj"])
