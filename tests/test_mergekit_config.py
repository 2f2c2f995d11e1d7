"""mergekit merge configs run by mergeflow: each shared method gives what mergeflow's own
method gives, on tiny real Llama folders; what is not shared is refused, the field named."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import finetune_like
from formats import llama_config, quiet_transformers

from mergeflow.checkpoints import load_state_dict
from mergeflow.cli import main
from mergeflow.errors import ParameterError
from mergeflow.merge import merge_files
from mergeflow.mergekit_config import translate


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A 3-layer float32 Llama base folder and two fine-tuned folders; their state dicts."""
    from transformers import LlamaForCausalLM

    quiet_transformers()
    root = tmp_path_factory.mktemp("kit")
    torch.manual_seed(8)
    base = LlamaForCausalLM(llama_config(num_hidden_layers=3))
    states = [base.state_dict()] + finetune_like(base.state_dict(), num_tasks=2, seed=9)
    folders = []
    for i, state in enumerate(states):
        model = LlamaForCausalLM(llama_config(num_hidden_layers=3))
        model.load_state_dict(state)
        folders.append(root / ("base" if i == 0 else f"task{i}"))
        model.save_pretrained(folders[-1])
    return folders, [{k: v.clone() for k, v in s.items()} for s in states]


def run(config: dict, tmp_path, name="out"):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / f"{name}.safetensors"
    assert main(["merge", "--config", str(path), "--out", str(out), "-q"]) == 0
    return load_state_dict(out)


def direct(method, folders, params, tmp_path, base=True):
    out = tmp_path / f"direct-{method}.safetensors"
    merge_files(method, str(folders[0]) if base else None, list(map(str, folders[1:])),
                params, out)  # fmt: skip
    return load_state_dict(out)


def same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_task_arithmetic_and_ties_configs_are_mergeflows_methods(llamas, tmp_path):
    folders, _ = llamas
    models = [{"model": str(f), "parameters": {"weight": 0.3}} for f in folders[1:]]
    base = {"base_model": str(folders[0]), "dtype": "float32"}
    ta = run({"merge_method": "task_arithmetic", "models": models, **base}, tmp_path, "ta")
    same(ta, direct("task_arithmetic", folders, {"scale": 0.3}, tmp_path))
    dense = [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.4}}
             for f in folders[1:]]  # fmt: skip
    listed = [{"model": str(folders[0])}, *dense]  # the base among the models, as is common
    ties = run({"merge_method": "ties", "models": listed, **base}, tmp_path, "ties")
    same(ties, direct("ties", folders, {"density": 0.4, "trim": "tensor"}, tmp_path))


def test_linear_and_passthrough_configs_are_layer_recipes(llamas, tmp_path):
    folders, states = llamas
    linear = {
        "merge_method": "linear",
        "models": [
            {"model": str(folders[1]), "parameters": {"weight": 1.0}},
            {"model": str(folders[2]), "parameters": {"weight": 3.0}},
        ],
    }
    blended = run(linear, tmp_path, "linear")
    for key in blended:
        torch.testing.assert_close(blended[key], 0.25 * states[1][key] + 0.75 * states[2][key])
    tiles = [
        {"sources": [{"model": str(folders[1]), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(folders[2]), "layer_range": [1, 2]}]},
        {"sources": [{"model": str(folders[1]), "layer_range": [2, 3]}]},
    ]
    swapped = run({"merge_method": "passthrough", "slices": tiles}, tmp_path, "pass")
    key = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(swapped[key.format(1)], states[2][key.format(1)])
    assert torch.equal(swapped[key.format(2)], states[1][key.format(2)])
    assert torch.equal(swapped["lm_head.weight"], states[1]["lm_head.weight"])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"merge_method": "slerp"}, "merge_method: 'slerp' is not one mergeflow shares"),
        (
            {"merge_method": "task_arithmetic", "base_model": "b",
             "models": [{"model": "x", "parameters": {"weight": 0.3}},
                        {"model": "y", "parameters": {"weight": 0.5}}]},
            "models.1.parameters: {'weight': 0.5} differs from the first model's",
        ),
        (
            {"merge_method": "ties", "base_model": "b",
             "models": [{"model": "x", "parameters": {"density": 0.5, "gamma": 0.1}}]},
            "parameters.gamma: not a parameter mergeflow shares",
        ),
        (
            {"merge_method": "passthrough", "slices": [
                {"sources": [{"model": "x", "layer_range": [0, 2]}]},
                {"sources": [{"model": "y", "layer_range": [0, 2]}]}]},
            "slices.1.sources.0.layer_range: starts at 0, not 2",
        ),
        (
            {"merge_method": "passthrough", "slices": [
                {"sources": [{"model": "x", "layer_range": [0, 1]}]},
                {"sources": [{"model": "y", "layer_range": [1, 2]}]}]},
            "slices: the first and last slices take other sources",
        ),
        ({"merge_method": "linear", "models": [], "tokenizer_merge": 1}, "tokenizer_merge: not a"),
    ],
)  # fmt: skip
def test_what_is_not_shared_is_refused_with_the_field_named(config, message):
    with pytest.raises(ParameterError, match=message.replace("(", r"\(").replace("[", r"\[")):
        translate(config, "merge.yml")
