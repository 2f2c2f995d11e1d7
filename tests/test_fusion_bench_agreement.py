"""mergeflow's methods against FusionBench's implementations on the same inputs.

FusionBench (PyPI ``fusion-bench``, the ``fusionbench`` extra) holds reference code for TIES,
TSV-M, Iso-C, Iso-CTS and TALL masks; each test builds the same task vectors of a tiny real
open_clip tower, runs both, and compares every tensor. mergeflow streams tensor by tensor
and finds TIES' model-wide threshold without flattening the model; FusionBench flattens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    finetune_like,
    fold_all,
    merged_by,
    tiny_data_aware_inputs,
    tiny_tower,
    tiny_tower_state,
)

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


def fusion_bench_concrete(module: str):
    """A module of ``fusion_bench.method.concrete_subspace``, beneath a bare package entry
    (its ``__init__`` imports more than its classes need, as OPCM's does)."""
    import importlib
    import sys
    import types
    from pathlib import Path

    import fusion_bench.method

    name = "fusion_bench.method.concrete_subspace"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(fusion_bench.method.__file__).parent / "concrete_subspace")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.{module}")


class _FusionBenchHarness:
    """The attributes fusion_bench's Concrete classes read from ``self`` (config, Fabric,
    profiler, the test loaders and the zero-shot logits), without Lightning or datasets:
    every loader yields the task's whole sample set, which makes each batch the same set
    mergeflow's seeded batches draw when batch_size equals the sample count."""

    def __init__(self, config, images, heads, logit_scale):
        import contextlib
        import types

        self.config = types.SimpleNamespace(**config)
        self.is_debug_mode = False
        self.fabric = types.SimpleNamespace(
            setup=lambda model, optimizer: (model, optimizer),
            is_global_zero=True,
            backward=lambda loss: loss.backward(),
            log_dict=lambda *args, **kwargs: None,
        )
        self.profile = lambda name: contextlib.nullcontext()
        self.modelpool = types.SimpleNamespace(model_names=list(images))
        self.to_device = lambda x: x
        self.merge_dtype = torch.float32
        self.images, self.heads, self.logit_scale = images, heads, logit_scale

    def get_shuffled_test_loader_iter(self, task):
        return iter([(self.images[task],)])

    def compute_logits(self, module, images, task):
        features = module(images)
        features = features / features.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * features @ self.heads[task].T


@pytest.fixture(scope="module")
def concrete_inputs():
    return tiny_data_aware_inputs()


def _reference_concrete(concrete_inputs, variant, config):
    """fusion_bench's Concrete TA or layer-wise Concrete AdaMerging on the same inputs,
    run with the global RNG at seed 0 (the state mergeflow's seeded generator starts in)."""
    from fusion_bench.models.masks import MaskModel
    from fusion_bench.models.wrappers.layer_wise_fusion import (
        LayerWiseMergedModel,
        get_layer_wise_weights,
    )
    from fusion_bench.models.wrappers.task_wise_fusion import (
        TaskWiseMergedModel,
        get_task_wise_weights,
    )

    base, finetuned, samples, inputs = concrete_inputs
    images = {s.name: s.images for s in samples}
    heads = {s.name: s.head for s in samples}
    harness = _FusionBenchHarness(config, images, heads, inputs.model.logit_scale.detach())
    pretrained = tiny_tower(base)
    mask_model = MaskModel(pretrained, ignore_untrained_params=True, parameter_type="logits")
    mask_model.fill_(0.0)
    mask_model.device = torch.device("cpu")
    tuned = [tiny_tower(s) for s in finetuned]
    torch.manual_seed(0)
    if variant == "task_arithmetic":
        module = TaskWiseMergedModel(
            get_task_wise_weights(3, 0.3),
            pretrained,
            tuned,
            clamp_weights=False,
            tie_weights=True,
            strict=False,
        )
        algorithm = fusion_bench_concrete("clip_concrete_task_arithmetic")
        algorithm.ConcreteTaskArithmeticAlgorithmForCLIP.train_mask(harness, module, mask_model)
    else:
        layers = len([p for p in pretrained.parameters() if p.requires_grad])
        weights = get_layer_wise_weights(3, layers, 0.3)
        harness.init_layer_wise_weight = weights.clone()
        module = LayerWiseMergedModel(
            weights, pretrained, tuned, clamp_weights=False, tie_weights=True, strict=False
        )
        algorithm = fusion_bench_concrete("clip_concrete_adamerging")
        cls = algorithm.ConcreteLayerWiseAdaMergingForCLIP
        cls.train_mask(harness, module, mask_model)
    with torch.no_grad():
        mask = mask_model.sample_mask(mask_type="continuous", temperature=0.5)
        mask = {name: m / m.mean() for name, m in mask.items()}
    if variant != "task_arithmetic":
        module = cls.run_adamerging(harness, module, mask=mask)
    with torch.no_grad():
        merged = module.merge_and_unload(mask)
    return {f"visual.{k}": v for k, v in merged.state_dict().items()}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("variant", ["task_arithmetic", "adamerging"])
def test_concrete_agrees_with_fusion_bench(concrete_inputs, variant):
    from mergeflow.data_aware.concrete import ConcreteParams, run_concrete

    steps = {"max_steps": 6, "max_adamerging_steps": 4}
    config = {
        "optimizer": "adam",
        "lr": 5e-2,
        "temperature": 0.5,
        "save_interval": 10**9,
        # the inner step's default lr, 1, magnifies float-order differences step by step
        # (3e-3 apart after 6 steps); the algorithm is the same at any lr
        "base_lr": 0.1,
        "adamerging_lr": 1e-2,
        **steps,
    }
    reference = _reference_concrete(concrete_inputs, variant, config)
    *_, inputs = concrete_inputs
    params = ConcreteParams(
        over=variant,
        steps=6,
        adamerging_steps=4,
        lr=5e-2,
        adamerging_lr=1e-2,
        samples=8,
        batch_size=8,
        final_mask="sample",
        seed=0,
        fusion_bench_parity=True,
        base_lr=0.1,
    )
    merged = run_concrete(inputs, params).state
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, atol=2e-5, rtol=1e-4, msg=key)
    if variant == "adamerging":
        # by default the inner gradient is taken at the reset λ, as the paper states the
        # step: the same merge as fusion_bench's after one meta step, another after more
        one = {"max_steps": 1, "max_adamerging_steps": 0}
        first = _reference_concrete(concrete_inputs, variant, {**config, **one})
        stated = params.model_copy(update={"fusion_bench_parity": False})
        ours_first = run_concrete(
            inputs, stated.model_copy(update={"steps": 1, "adamerging_steps": 0})
        ).state
        for key, value in first.items():
            torch.testing.assert_close(ours_first[key], value, atol=2e-5, rtol=1e-4, msg=key)
        later = run_concrete(inputs, stated).state
        assert any(not torch.allclose(later[k], reference[k], atol=1e-3) for k in reference)
    # the mask moved: the same run without training merges something else
    untrained = run_concrete(inputs, params.model_copy(update={"steps": 0})).state
    assert any(not torch.allclose(untrained[k], reference[k], atol=1e-4) for k in reference)
