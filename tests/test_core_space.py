"""Core Space merging of real PEFT LoRA adapters of a tiny Llama (built offline)."""

from __future__ import annotations

import pytest
import torch
from formats import llama_folders, lora_adapters

from mergeflow.checkpoints import open_checkpoints
from mergeflow.errors import ParameterError
from mergeflow.merge import merge_files, merge_readers
from mergeflow.methods.core_space import cores_of

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A float32 Llama base folder and four adapters of mixed ranks on three modules."""
    root = tmp_path_factory.mktemp("core")
    folders, _ = llama_folders(root, num_tasks=0, dtype=torch.float32)
    ranks = [2, 4, 4, 3]
    found = lora_adapters(
        root, folders[0], [dict(r=r, lora_alpha=8, target_modules=TARGETS) for r in ranks]
    )
    return folders[0], found


def merged(base, adapters, name, **params):
    with open_checkpoints(list(map(str, adapters)), str(base)) as (base_reader, readers):
        return merge_readers(name, readers, base_reader, params, device="cpu")


def test_task_arithmetic_in_core_space_is_task_arithmetic(adapters):
    base, found = adapters
    core = merged(base, found, "core_space", method="task_arithmetic", params={"scale": 0.7})
    full = merged(base, found, "task_arithmetic", scale=0.7)
    assert core.keys() == full.keys()
    for key in full:
        torch.testing.assert_close(core[key], full[key], atol=1e-6, rtol=1e-5, msg=key)


def test_the_cores_reconstruct_every_adapter_exactly(adapters):
    base, found = adapters
    key = "model.layers.1.mlp.down_proj.weight"
    with open_checkpoints(list(map(str, found)), str(base)) as (_, readers):
        factors = [r.low_rank_factors(key) for r in readers]
        dense = [r.adapter.delta(key) for r in readers]
    u_b, cores, v_a = cores_of(factors)
    assert u_b.shape[1] == v_a.shape[0] == 2 + 4 + 4 + 3  # R = Σ r_t
    for core, delta in zip(cores, dense, strict=True):
        torch.testing.assert_close(u_b @ core @ v_a, delta, atol=1e-5, rtol=1e-5)


def test_cart_in_core_space_counts_k_in_core_dimensions(adapters):
    base, found = adapters
    key = "model.layers.0.self_attn.q_proj.weight"
    core = merged(base, found, "core_space", method="cart", params={"rank_ratio": 0.25})
    full = merged(base, found, "cart", rank_ratio=0.25)
    everything = merged(base, found, "core_space", method="cart", params={"rank_ratio": 1.0})
    average = merged(base, found, "average")
    # at full rank both are the average; below it they differ: k = 3 of 13 core directions
    # here, 8 of 32 in full space
    torch.testing.assert_close(everything[key], average[key], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(core[key], full[key], atol=1e-4)
    for method in ("ties", "tsv_m", "iso_c"):
        result = merged(base, found, "core_space", method=method)
        assert torch.isfinite(result[key]).all() and not torch.equal(result[key], average[key])


def test_core_space_takes_adapters_only_and_names_what_is_wrong(adapters, tmp_path):
    base, found = adapters
    dense = tmp_path / "dense.safetensors"
    from mergeflow.checkpoints import save_state_dict

    with open_checkpoints([str(found[0])], str(base)) as (_, (reader,)):
        save_state_dict(reader.to_state_dict(), dense)
    with pytest.raises(ParameterError, match="dense.safetensors is not a PEFT adapter"):
        merge_files("core_space", str(base), [str(found[1]), str(dense)], {}, tmp_path / "o")
    with pytest.raises(ParameterError, match="use trim: tensor"):
        merge_files("core_space", str(base), list(map(str, found)),
                    {"method": "ties", "params": "{trim: model}"}, tmp_path / "o")  # fmt: skip


def test_a_core_space_merge_written_as_one_adapter_holds_the_delta(adapters, tmp_path):
    base, found = adapters
    out = tmp_path / "adapter"
    params = {"method": "tsv_m", "params": "{scale: 0.5}"}
    merge_files("core_space", str(base), list(map(str, found)), params, out,
                out_format="lora", rank=13)  # fmt: skip
    dense = merged(base, found, "core_space", method="tsv_m", params={"scale": 0.5})
    with open_checkpoints([str(out)], str(base)) as (_, (reader,)):
        for key in reader.adapter.targets:
            torch.testing.assert_close(reader.get(key), dense[key], atol=1e-5, rtol=1e-4)
    from safetensors.torch import load_file

    ranks = {v.shape[0] for k, v in load_file(out / "adapter_model.safetensors").items()
             if ".lora_A." in k}  # fmt: skip
    assert ranks == {13}  # R' = Σ r_t: the whole delta, exactly


# --- LoRA-LEGO --------------------------------------------------------------------------------


def test_lora_lego_with_a_cluster_per_unit_is_task_arithmetic(adapters):
    base, found = adapters
    lego = merged(base, found, "lora_lego", rank=13, scale=0.5)  # 2 + 4 + 4 + 3 units
    full = merged(base, found, "task_arithmetic", scale=0.5)
    for key in full:
        torch.testing.assert_close(lego[key], full[key], atol=1e-6, rtol=1e-5, msg=key)


def test_lora_lego_merges_into_one_adapter_of_rank_k(adapters):
    base, found = adapters
    key = "model.layers.1.self_attn.v_proj.weight"
    first = merged(base, found, "lora_lego", rank=3, seed=4)
    again = merged(base, found, "lora_lego", rank=3, seed=4)
    assert torch.equal(first[key], again[key])  # seeded
    with open_checkpoints([str(found[0])], str(base)) as (base_reader, _):
        delta = first[key] - base_reader.get(key)
    assert int(torch.linalg.matrix_rank(delta, atol=1e-5)) == 3


def test_lora_lego_joins_the_same_unit_from_every_adapter(adapters):
    """The same adapter arriving four times: one cluster per unit, each standing for its
    four copies, so the merge is 4 λ ΔW_1 at the adapter's own rank."""
    base, found = adapters
    copies = [found[1]] * 4
    lego = merged(base, copies, "lora_lego", rank=4, scale=0.5)
    with open_checkpoints([str(found[1])], str(base)) as (base_reader, (reader,)):
        for key in reader.adapter.targets:
            expected = base_reader.get(key) + 2.0 * reader.adapter.delta(key)
            torch.testing.assert_close(lego[key], expected, atol=1e-5, rtol=1e-4, msg=key)
