"""Twin-Merging: the twin vectors, the router, routed inference, the file, the pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClip, candidate, tiny_data_aware_inputs, tiny_tower

from mergeflow.errors import ParameterError
from mergeflow.twin import (
    TWIN_MERGING,
    TwinParams,
    build_twin,
    compress,
    load_twin,
    save_twin,
    train_router,
)


@pytest.fixture(scope="module")
def tiny():
    """Three tasks whose images carry a pattern of their own, so a router can tell them
    apart."""
    base, finetuned, samples, inputs = tiny_data_aware_inputs(num_tasks=3, samples=40)
    patterns = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    images = [(s.name, s.images * 0.3 + 2.0 * patterns[t]) for t, s in enumerate(samples)]
    return base, finetuned, samples, inputs, images


def build(tiny, **params):
    base, finetuned, _, inputs, images = tiny
    settings = {"epochs": 60, "lr": 5e-3, **params}
    return build_twin(inputs.model, base, finetuned, images, TwinParams(**settings))


def test_compress_keeps_the_top_singular_triplets_and_vectors_whole():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(20, 12, generator=gen)
    twin = compress(matrix, 0.25)  # k = int(0.25 · 12) = 3
    assert twin.a.shape == (20, 3) and twin.b.shape == (3, 12)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(twin.dense(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)
    # full rank gives the matrix back; a tiny density still keeps one triplet
    torch.testing.assert_close(compress(matrix, 1.0).dense(), matrix, atol=1e-5, rtol=1e-5)
    assert compress(matrix, 0.01).a.shape[1] == 1
    vector = torch.randn(7, generator=gen)
    torch.testing.assert_close(compress(vector, 0.1).dense(), vector)
    # a patch embedding (out, in, h, w) is truncated as (out, in·h·w)
    conv = torch.randn(8, 3, 2, 2, generator=gen)
    assert compress(conv, 0.5).a.shape == (8, 4) and compress(conv, 0.5).dense().shape == conv.shape


def test_full_rank_twin_routed_to_one_task_is_that_tasks_model(tiny):
    base, finetuned, *_ = tiny
    twin, _, _ = build(tiny, density=1.0, epochs=0)
    for t, state in enumerate(finetuned):
        weights = torch.nn.functional.one_hot(torch.tensor(t), 3).float()
        synthesized = twin.synthesize(weights)
        for key, value in synthesized.items():
            expected = state[f"visual.{key}"]
            torch.testing.assert_close(value, expected, atol=2e-5, rtol=1e-4, msg=key)


def test_router_learns_which_task_an_input_came_from():
    gen = torch.Generator().manual_seed(3)
    centers = torch.randn(4, 16, generator=gen) * 3
    labels = torch.arange(4).repeat_interleave(50)
    features = centers[labels] + torch.randn(200, 16, generator=gen)
    router = train_router(features, labels, 4, TwinParams(epochs=60, lr=5e-3, batch_size=64))
    with torch.no_grad():
        accuracy = (router(features).argmax(1) == labels).float().mean()
    assert accuracy > 0.95


def test_twin_router_measures_itself_on_held_out_images(tiny):
    _, _, info = build(tiny)
    assert info["router_held_out_accuracy"] > 0.9
    assert info["router_samples"] == {"task0": 40, "task1": 40, "task2": 40}
    assert info["twin_bytes"] < info["shared_bytes"]  # 10% of each matrix's rank


def _counting(twin, monkeypatch):
    calls = []
    synthesize = twin.synthesize

    def counted(weights):
        calls.append(weights)
        return synthesize(weights)

    monkeypatch.setattr(twin, "synthesize", counted)
    return calls


def test_a_batch_of_one_task_costs_one_weight_synthesis(tiny, monkeypatch):
    *_, images = tiny
    twin, _, _ = build(tiny)
    calls = _counting(twin, monkeypatch)
    batch = images[1][1][:12]
    assert (twin.route(batch).argmax(1) == 1).all()
    features, weights = twin.image_features(batch)
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], weights.mean(0))
    mixed = torch.cat([images[0][1][:5], images[2][1][:5]])
    twin.image_features(mixed)
    assert len(calls) == 3  # one more per routed task


def test_per_row_routing_is_the_papers_theta_of_x(tiny, monkeypatch):
    *_, images = tiny
    twin, _, _ = build(tiny, routing="per_row")
    batch = torch.cat([images[0][1][:3], images[2][1][:3]])
    features, weights = twin.image_features(batch)
    for row in range(len(batch)):
        alone = twin.features(batch[row : row + 1], twin.synthesize(weights[row]))
        torch.testing.assert_close(features[row : row + 1], alone, atol=1e-5, rtol=1e-4)
    # the mean weights of a group are not any row's: per_task differs from per_row
    twin.routing = "per_task"
    grouped, _ = twin.image_features(batch)
    assert not torch.allclose(grouped, features, atol=1e-6)


def test_twin_file_round_trip_and_refusal(tiny, tmp_path):
    base, _, samples, _, images = tiny
    twin, shared, info = build(tiny)
    path = str(tmp_path / "twin.safetensors")
    save_twin(twin, shared, path, info)
    model = TinyClip(tiny_tower(base))
    again = load_twin(path, model, complement={"logit_scale": model.logit_scale.detach()})
    batch = torch.cat([images[0][1][:4], images[1][1][:4]])
    head = samples[0].head
    torch.testing.assert_close(again.logits(batch, head), twin.logits(batch, head))
    assert again.tasks == ("task0", "task1", "task2")
    from mergeflow.checkpoints import save_state_dict

    plain = str(tmp_path / "plain.safetensors")
    save_state_dict(base, plain)
    with pytest.raises(ParameterError, match="plain.safetensors: not a Twin-Merging file"):
        load_twin(plain, model)


def test_twin_merging_is_refused_where_it_cannot_run():
    from mergeflow.methods import get_method
    from mergeflow.spec import FamilySpec

    with pytest.raises(ParameterError, match="builds a routed model"):
        get_method("twin_merging")
    with pytest.raises(ValueError, match="list it under baselines"):
        FamilySpec(method="twin_merging", search={"density": [0.1, 0.2]})
    with pytest.raises(ParameterError, match="'shared_params': method 'ties' has no parameter"):
        TWIN_MERGING.parse_params({"shared": "ties", "shared_params": {"bogus": 1}})


@pytest.fixture(scope="module")
def local_zoo_run(zoo, tmp_path_factory):
    from conftest import run_of

    from zoo.zoo import zoo_spec

    folder, manifest = zoo
    spec = zoo_spec(manifest, str(folder), "zoo-twin", device="cpu")
    return run_of(spec, tmp_path_factory.mktemp("cache"))


def test_twin_merging_in_the_pipeline_is_a_routed_row(local_zoo_run):
    from mergeflow import pipeline
    from mergeflow.evaluation import SELECTION

    run = local_zoo_run
    routed = candidate("twin_merging", epochs=30, lr=5e-3, samples=32)
    assert routed.report_kind == "routed"
    scores = pipeline.score(run, routed, SELECTION)
    assert set(scores) == set(run.task_names)
    info = routed.learned(run)
    assert 0 < info["stored_bytes"] < info["checkpoint_bytes"]
    # against its own shared merge: routing each image to its task's twin vector helps
    shared = pipeline.score(run, candidate("task_arithmetic", scale=0.3), SELECTION)
    assert sum(scores.values()) >= sum(shared.values()) - 0.05 * len(scores)
    with pytest.raises(ParameterError, match="is a routed model"):
        routed.state(run)
