"""mergeflow's methods against FusionBench's implementations on the same inputs.

FusionBench (PyPI ``fusion-bench``, the ``fusionbench`` extra) holds reference code for TIES,
TSV-M, Iso-C, Iso-CTS and TALL masks; each test builds the same task vectors of a tiny real
open_clip tower, runs both, and compares every tensor. mergeflow streams tensor by tensor
and finds TIES' model-wide threshold without flattening the model; FusionBench flattens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_like, tiny_tower_state

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
