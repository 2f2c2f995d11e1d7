"""mergeflow's methods against FusionBench's implementations on the same inputs.

FusionBench (PyPI ``fusion-bench``, the ``fusionbench`` extra) holds reference code for TIES,
TSV-M, Iso-C, Iso-CTS and TALL masks; each test builds the same task vectors of a tiny real
open_clip tower, runs both, and compares every tensor. mergeflow streams tensor by tensor
and finds TIES' model-wide threshold without flattening the model; FusionBench flattens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_like, fold_all, merged_by, tiny_tower_state

from mergeflow.checkpoints import StateDictReader
from mergeflow.merge import merge_readers

pytest.importorskip("fusion_bench", reason="the fusionbench extra is not installed")

from fusion_bench.method.isotropic_merging import iso_utils  # noqa: E402
from fusion_bench.method.tall_mask.utils import generate_task_masks  # noqa: E402
from fusion_bench.method.task_singular_vector.utils import TSVM_utils  # noqa: E402
from fusion_bench.method.ties_merging import ties_merging_utils  # noqa: E402


@pytest.fixture(scope="module")
def models():
    base = tiny_tower_state(seed=3, width=32, layers=2)
    return base, finetune_like(base, num_tasks=4, seed=7)


def task_vectors(base, finetuned):
    return [{k: ft[k] - base[k] for k in base} for ft in finetuned]


def ours(method, base, finetuned, **params):
    readers = [StateDictReader(s, f"task{i}") for i, s in enumerate(finetuned)]
    return merge_readers(
        method, readers, StateDictReader(base, "base"), params=params, device="cpu"
    )


def assert_same(merged, reference, atol=2e-6):
    assert merged.keys() == reference.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], atol=atol, rtol=1e-4, msg=key)


def add(base, vector, scale=1.0):
    return {k: base[k] + scale * vector[k] for k in base}


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_agrees_with_fusion_bench(models, density, aggregate):
    base, finetuned = models
    tvs = task_vectors(base, finetuned)
    flat = torch.vstack([ties_merging_utils.state_dict_to_vector(tv) for tv in tvs])
    merged_flat = ties_merging_utils.ties_merging(flat, reset_thresh=density, merge_func=aggregate)
    reference = add(base, ties_merging_utils.vector_to_state_dict(merged_flat, base), 0.7)
    merged = ours("ties", base, finetuned, density=density, aggregate=aggregate, scale=0.7)
    assert_same(merged, reference)


def test_tsv_m_agrees_with_fusion_bench(models):
    base, finetuned = models
    delta = TSVM_utils.compute_and_sum_svd_mem_reduction(
        task_vectors(base, finetuned), accelerator="cpu"
    )
    assert_same(ours("tsv_m", base, finetuned, scale=1.0), add(base, delta), atol=1e-5)


def test_iso_c_agrees_with_fusion_bench(models):
    base, finetuned = models
    delta = iso_utils.iso_c(task_vectors(base, finetuned), accelerator="cpu")
    assert_same(ours("iso_c", base, finetuned, scale=1.3), add(base, delta, 1.3), atol=1e-5)


def test_iso_cts_agrees_with_fusion_bench(models):
    base, finetuned = models
    delta = iso_utils.iso_cts(
        task_vectors(base, finetuned), common_space_fraction=0.8, accelerator="cpu"
    )
    merged = ours("iso_cts", base, finetuned, scale=1.5, common_fraction=0.8)
    assert_same(merged, add(base, delta, 1.5), atol=1e-5)


@pytest.mark.parametrize("task", [0, 3])
def test_tall_masks_agree_with_fusion_bench(models, task):
    base, finetuned = models
    tvs = task_vectors(base, finetuned)
    to_vector = ties_merging_utils.state_dict_to_vector
    flat_tvs = torch.vstack([to_vector(tv) for tv in tvs])
    flat_ft = torch.vstack([to_vector(ft) for ft in finetuned])
    masks = generate_task_masks(flat_tvs, flat_ft, to_vector(base), tall_mask_lambda=0.4)
    retrieved = masks[task] * flat_tvs.sum(0)
    reference = add(base, ties_merging_utils.vector_to_state_dict(retrieved, base))
    merged = ours("tall_masks", base, finetuned, task=task, mask_lambda=0.4)
    assert_same(merged, reference, atol=1e-5)


def fusion_bench_opcm():
    """fusion_bench's general OPCM class. The package ``fusion_bench.method.opcm`` cannot be
    imported under transformers 5 (its ``__init__`` pulls in a task pool that imports a
    removed CLIP class), so its module is loaded beneath a bare package entry instead."""
    import importlib
    import sys
    import types
    from pathlib import Path

    import fusion_bench.method

    name = "fusion_bench.method.opcm"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(fusion_bench.method.__file__).parent / "opcm")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.opcm_general").OPCM


@pytest.fixture(scope="module")
def hf_clip_stream():
    """A tiny Hugging Face CLIPVisionModel (the model fusion_bench's OPCM is written for)
    and four fine-tuned copies, as modules and as state dicts."""
    from formats import hf_clip_config, quiet_transformers
    from transformers import CLIPVisionModel

    quiet_transformers()
    config = hf_clip_config().vision_config
    torch.manual_seed(11)
    base = CLIPVisionModel(config).eval()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tuned_states = finetune_like(base_state, num_tasks=4, seed=13)
    tuned = []
    for state in tuned_states:
        model = CLIPVisionModel(config).eval()
        model.load_state_dict(state)
        tuned.append(model)
    return base, tuned, base_state, tuned_states


def model_pool(base, tuned):
    """A fusion_bench pool of copies: its continual methods change the first model in place."""
    import copy

    from fusion_bench import BaseModelPool

    models = {"_pretrained_": base, **{f"task{i}": m for i, m in enumerate(tuned)}}
    return BaseModelPool({name: copy.deepcopy(m) for name, m in models.items()})


@pytest.mark.filterwarnings("ignore")
def test_opcm_agrees_with_fusion_bench(hf_clip_stream):
    base, tuned, base_state, tuned_states = hf_clip_stream
    pool = model_pool(base, tuned)
    algorithm = fusion_bench_opcm()(
        alpha=0.5, shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False
    )
    reference = algorithm.run(pool).state_dict()
    parity = ours("opcm", base_state, tuned_states, alpha=0.5, fusion_bench_parity=True)
    assert_same(parity, reference, atol=2e-5)
    # without the parity mode class_embedding is merged like any other tensor: it differs,
    # and so does every tensor a little (the merged vector's norm includes it)
    merged = ours("opcm", base_state, tuned_states, alpha=0.5)
    key = "embeddings.class_embedding"
    assert not torch.allclose(merged[key], reference[key], atol=1e-3)
    assert not torch.allclose(merged[key], parity[key], atol=1e-3)


@pytest.mark.filterwarnings("ignore")
def test_continual_ties_agrees_with_fusion_bench(hf_clip_stream, tmp_path, monkeypatch):
    import importlib
    import sys
    import types

    fusion_bench_opcm()  # the bare package entry
    # its module imports a task pool only to name a type (the import fails under
    # transformers 5); the class runs without one
    stand_in = types.ModuleType("fusion_bench.taskpool")
    stand_in.CLIPVisionModelTaskPool = object
    monkeypatch.setitem(sys.modules, "fusion_bench.taskpool", stand_in)
    module = importlib.import_module("fusion_bench.method.opcm.ties_merging")
    base, tuned, base_state, tuned_states = hf_clip_stream
    algorithm = module.ContinualTiesMergingForCLIP(
        scaling_factor=0.5,
        threshold=20,
        merge_func="sum",
        shuffle_order=False,
        save_on_every_step=False,
        evaluate_on_every_step=False,
    )
    algorithm._program = types.SimpleNamespace(taskpool=types.SimpleNamespace(_test_datasets={}))
    pool = model_pool(base, tuned)
    reference = algorithm.run(pool).state_dict()
    record, running = fold_all(
        "ties", base_state, tuned_states, tmp_path, {"density": 0.2, "scale": 0.5}
    )
    assert_same(merged_by(record, base_state, running), reference, atol=1e-6)
