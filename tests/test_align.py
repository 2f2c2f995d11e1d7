"""Weight matching on real open_clip image towers (built from configs, offline): the
permutation groups keep the tower's function, a head-agnostic one would not, and matching
finds a permutation back."""

from __future__ import annotations

import pytest
import torch

from mergeflow.align import VitPermutation, match_weights, permute, vit_layout
from mergeflow.errors import ParameterError

WIDTH, LAYERS, HEADS = 32, 2, 4


def tower(seed: int):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=16, patch_size=8, width=WIDTH, layers=LAYERS,
                              heads=HEADS, mlp_ratio=2.0, output_dim=16)  # fmt: skip
    return model.double().eval()


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def outputs(model, state, images):
    model.load_state_dict(state)
    with torch.no_grad():
        return model(images)


def random_permutation(seed: int) -> VitPermutation:
    gen = torch.Generator().manual_seed(seed)
    d_head = WIDTH // HEADS

    def inner():
        return torch.stack([torch.randperm(d_head, generator=gen) for _ in range(HEADS)])

    return VitPermutation(
        torch.randperm(WIDTH, generator=gen),
        [torch.randperm(2 * WIDTH, generator=gen) for _ in range(LAYERS)],
        [torch.randperm(HEADS, generator=gen) for _ in range(LAYERS)],
        [inner() for _ in range(LAYERS)],
        [inner() for _ in range(LAYERS)],
    )


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).double()


def test_the_permutation_groups_keep_the_function(images):
    model = tower(1)
    state = state_of(model)
    permuted = permute(state, random_permutation(2), vit_layout(state, HEADS))
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    torch.testing.assert_close(outputs(model, permuted, images), outputs(model, state, images),
                               atol=1e-12, rtol=1e-12)  # fmt: skip


def test_a_head_agnostic_query_key_permutation_changes_the_function(images):
    model = tower(1)
    state = state_of(model)
    key = "transformer.resblocks.0.attn.in_proj_weight"
    flat = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(3))
    broken = dict(state)
    weight, bias = state[key].clone(), state[key.replace("weight", "bias")].clone()
    rows = torch.cat([flat, flat + WIDTH, torch.arange(2 * WIDTH, 3 * WIDTH)])
    broken[key], broken[key.replace("weight", "bias")] = weight[rows], bias[rows]
    difference = (outputs(model, broken, images) - outputs(model, state, images)).abs().max()
    assert difference > 1e-3


def test_matching_finds_a_permuted_copy_back(images):
    model = tower(4)
    state = state_of(model)
    shuffled = permute(state, random_permutation(5), vit_layout(state, HEADS))
    aligned, _ = match_weights(state, shuffled, HEADS)
    for key in state:
        torch.testing.assert_close(aligned[key], state[key], atol=1e-12, rtol=0, msg=key)


def test_matching_brings_another_init_closer_and_keeps_its_function(images):
    reference, other = tower(6), tower(7)
    ref_state, state = state_of(reference), state_of(other)
    aligned, _ = match_weights(ref_state, state, HEADS)

    def distance(a):
        return sum(float((a[k] - ref_state[k]).square().sum()) for k in ref_state) ** 0.5

    assert distance(aligned) < distance(state)
    torch.testing.assert_close(outputs(other, aligned, images), outputs(other, state, images),
                               atol=1e-12, rtol=1e-12)  # fmt: skip


def test_what_is_not_an_image_tower_is_refused():
    with pytest.raises(ParameterError, match="no conv1.weight"):
        vit_layout({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, 2)
    with pytest.raises(ParameterError, match="does not split into 5 heads"):
        vit_layout(state_of(tower(1)), 5)


def test_mergeflow_align_writes_the_permuted_model(tmp_path, images, capsys):
    from mergeflow.checkpoints import load_state_dict, save_state_dict
    from mergeflow.cli import main

    model = tower(8)
    state = state_of(model)
    shuffled = permute(state, random_permutation(9), vit_layout(state, HEADS))
    save_state_dict(state, tmp_path / "ref.safetensors")
    save_state_dict(shuffled, tmp_path / "other.safetensors")
    out = tmp_path / "aligned.safetensors"
    ref, other = str(tmp_path / "ref.safetensors"), str(tmp_path / "other.safetensors")
    code = main(["align", "--reference", ref, "--model", other, "--heads", str(HEADS),
                 "--out", str(out)])  # fmt: skip
    assert code == 0 and "-> 0" in capsys.readouterr().out
    aligned = load_state_dict(out)
    for key in state:
        torch.testing.assert_close(aligned[key], state[key], atol=1e-12, rtol=0, msg=key)


def test_the_spec_aligns_checkpoints_before_merging(zoo, tmp_path):
    """A task fine-tuned from a permuted copy of the base (the same function, other
    coordinates: its checkpoint is the zoo's, permuted): merged unaligned, the average
    loses accuracy; the spec's ``align`` step finds the permutation back."""
    from conftest import run_of

    from mergeflow import pipeline
    from mergeflow.candidates import FixedMethod
    from mergeflow.checkpoints import load_state_dict, save_state_dict
    from mergeflow.evaluation import SELECTION
    from mergeflow.run import RunInputs
    from mergeflow.spec import AlignSpec
    from zoo.zoo import zoo_spec

    folder, manifest = zoo
    spec = zoo_spec(manifest, str(folder), "zoo-align", device="cpu")
    moved = spec.tasks[1]
    state = load_state_dict(moved.checkpoint)
    from mergeflow.models import image_tower_heads

    heads = image_tower_heads(spec.model)
    permuted = permute(state, VitPermutation.random(vit_layout(state, heads), 3),
                       vit_layout(state, heads))  # fmt: skip
    other = tmp_path / "permuted.safetensors"
    save_state_dict(permuted, str(other))
    tasks = (spec.tasks[0], moved.model_copy(update={"checkpoint": str(other)}), *spec.tasks[2:])
    unaligned = spec.model_copy(update={"tasks": tasks, "base_check": "off"})
    aligned_spec = unaligned.model_copy(update={"align": AlignSpec()})
    cache = tmp_path / "cache"
    aligned_inputs = pipeline.align_checkpoints(RunInputs.resolve(aligned_spec, str(cache)))
    assert aligned_inputs.spec.align is None
    back = load_state_dict(aligned_inputs.spec.tasks[1].checkpoint)
    for key in state:
        torch.testing.assert_close(back[key], state[key], msg=key)
    assert aligned_inputs.spec.tasks[0].checkpoint == spec.tasks[0].checkpoint

    average = FixedMethod(name="average", label="average")
    scores = {
        name: pipeline.score(run, average, SELECTION)
        for name, run in [
            ("original", run_of(spec, cache)),
            ("unaligned", run_of(unaligned, cache)),
        ]
    }
    from mergeflow.run import open_run

    scores["aligned"] = pipeline.score(open_run(aligned_inputs), average, SELECTION)
    mean = {name: sum(s.values()) / len(s) for name, s in scores.items()}
    assert mean["aligned"] == pytest.approx(mean["original"], abs=1e-6)
    assert mean["unaligned"] < mean["original"] - 0.02


def test_an_align_reference_must_be_a_task(zoo):
    from zoo.zoo import zoo_spec

    folder, manifest = zoo
    data = zoo_spec(manifest, str(folder), "zoo-align").model_dump(mode="json")
    data["align"] = {"reference": "nope"}
    from mergeflow.spec import MergeSpec

    with pytest.raises(ParameterError, match="align.reference: 'nope' is not one of the tasks"):
        MergeSpec.parse(data)
