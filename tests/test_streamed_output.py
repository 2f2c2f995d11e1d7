"""Streamed output: a merge writes each tensor to its file as it is made (no whole output in
memory), element-wise methods merge large tensors in row blocks, and a merge that fails
half-way leaves nothing new behind."""

from __future__ import annotations

import json

import pytest
import torch
from formats import llama_folders
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mergeflow.merge as merge_module
from mergeflow.checkpoints import open_checkpoint
from mergeflow.merge import merge_files, merge_readers
from mergeflow.methods import get_method
from mergeflow.outputs import StreamedOutput, aligned_order, plan_shards
from mergeflow.statedict import layout_of


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return llama_folders(tmp_path_factory.mktemp("llama"), dtype=torch.bfloat16)


def read_folder(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for name in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / name))
    assert set(state) == set(index["weight_map"])
    return state


def in_memory(method, folders, params):
    with open_checkpoint(folders[0]) as base:
        readers = [open_checkpoint(f) for f in folders[1:]]
        try:
            return merge_readers(method, readers, base, params, device="cpu")
        finally:
            for reader in readers:
                reader.close()


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"scale": 0.4}),
        ("ties", {"density": 0.3}),  # model-wide trim: thresholds from blocked passes
        ("average", {}),
    ],
)
def test_row_blocks_give_the_whole_tensor_merge_bit_for_bit(
    llamas, tmp_path, monkeypatch, method, params
):
    folders, _ = llamas
    whole = in_memory(method, folders, params)
    assert get_method(method).merges_elementwise(get_method(method).parse_params(params))
    # blocks of 512 float32 bytes: a 64 × 32 matrix is merged in 16 blocks of 4 rows
    monkeypatch.setattr(merge_module, "ROW_BLOCK_BYTES", 512)
    out = tmp_path / "merged"
    report = merge_files(method, folders[0], folders[1:], params, out, device="cpu")
    streamed = read_folder(out)
    assert set(streamed) == set(whole)
    for key, tensor in whole.items():
        assert streamed[key].dtype == torch.bfloat16
        assert torch.equal(streamed[key], tensor), key
    assert report.num_tensors == len(whole)
    assert report.num_bytes == sum(t.numel() * t.element_size() for t in whole.values())


def test_methods_that_need_a_whole_tensor_are_never_blocked(llamas, monkeypatch):
    seen: list[tuple] = []
    real = merge_module.load_for_compute

    def spy(reader, key, device, dtype, rows=None):
        seen.append(rows)
        return real(reader, key, device, dtype, rows)

    monkeypatch.setattr(merge_module, "ROW_BLOCK_BYTES", 512)
    monkeypatch.setattr(merge_module, "load_for_compute", spy)
    folders, _ = llamas
    for method, params in [("ties", {"density": 0.3, "trim": "tensor"}), ("cart", {})]:
        assert not get_method(method).merges_elementwise(get_method(method).parse_params(params))
        seen.clear()
        in_memory(method, folders, params)
        assert seen and all(rows is None for rows in seen), method


def test_a_sharded_streamed_folder_loads_in_transformers(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    folders, states = llamas
    out = tmp_path / "merged"
    merge_files("task_arithmetic", folders[0], folders[1:], {}, out, shard_size="20KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in states[0].values()
    )
    for shard in shards:  # each shard's header names exactly its keys, data 8-byte aligned
        with safe_open(shard, "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == shard.name} == set(f.keys())
            assert f.metadata()["mergeflow.method"] == "task_arithmetic"
        assert int.from_bytes(shard.read_bytes()[:8], "little") % 8 == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = in_memory("task_arithmetic", folders, {})
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_merge_that_fails_half_way_leaves_the_old_folder_as_it_was(llamas, tmp_path, monkeypatch):
    folders, _ = llamas
    out = tmp_path / "merged"
    merge_files("average", folders[0], folders[1:], {}, out, shard_size="20KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    method = get_method("task_arithmetic")
    calls, fail_at = 0, None

    def fails_on_the_last(key, finetuned, base, params, context):
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise RuntimeError("out of memory (simulated)")
        return method.merge_tensor(key, finetuned, base, params, context)

    counting = type(method)(**{**method.__dict__, "merge_tensor": fails_on_the_last})
    monkeypatch.setattr(merge_module, "get_method", lambda name: counting)
    merge_files("task_arithmetic", folders[0], folders[1:], {}, tmp_path / "once")
    calls, fail_at = 0, calls  # every shard but the last is complete when it fails
    with pytest.raises(RuntimeError, match="simulated"):
        merge_files("task_arithmetic", folders[0], folders[1:], {}, out, shard_size="20KB")
    assert calls == fail_at
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no .partial-* either


def test_one_file_streams_mixed_dtypes_aligned_and_refuses_what_breaks_its_plan(tmp_path):
    state = {
        "a.mask": torch.tensor([True, False, True]),
        "b.weight": torch.randn(5, 3).to(torch.bfloat16),
        "c.count": torch.tensor(7, dtype=torch.int64),
        "d.bias": torch.randn(3),
        "e.empty": torch.zeros(0, 4),
    }
    layout = layout_of(state)
    order = aligned_order(list(layout), layout)
    assert order == ["c.count", "d.bias", "e.empty", "b.weight", "a.mask"]
    path = tmp_path / "one.safetensors"
    with StreamedOutput({str(path): order}, layout, {"note": "x"}) as out:
        for key in out.order():
            out.write(key, state[key])
    loaded = load_file(path)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"note": "x"}

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.ones(2)}, other)
    old = other.read_bytes()
    refusals = [
        (["d.bias", "c.count"], r"got 'd\.bias', expected 'c\.count'"),  # out of order
        (["c.count", "d.bias!"], r"d\.bias.* \(2,\) torch\.float32, the header says \(3,\)"),
        (["c.count"], "not every tensor was written"),
    ]
    for writes, message in refusals:
        with (
            pytest.raises(RuntimeError, match=message),  # noqa: PT012
            StreamedOutput({str(other): order}, layout) as out,
        ):
            for key in writes:
                out.write(key.rstrip("!"), torch.ones(2) if key.endswith("!") else state[key])
        assert other.read_bytes() == old
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".partial")] == []


def test_shards_are_planned_in_order_with_oversized_tensors_alone():
    layout = {f"t{i}": ((n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])}
    assert plan_shards(layout, 80) == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert plan_shards(layout, 10**6) == [list(layout)]


def test_readers_read_only_the_rows_asked_for(llamas):
    folders, states = llamas
    key = "model.layers.0.mlp.up_proj.weight"  # 64 × 32, in a sharded folder
    with open_checkpoint(folders[1]) as reader:
        rows = reader.get_rows(key, 8, 20)
        assert torch.equal(rows, states[1][key][8:20])
        assert torch.equal(reader.get_rows(key, 60, 99), states[1][key][60:])


def test_the_finite_check_passes_huge_finite_weights_and_refuses_one_nan(tmp_path):
    """The check sums first: a sum that overflows on finite weights must not refuse them,
    and one NaN among them must still be found and counted."""
    from mergeflow.checkpoints import load_for_compute
    from mergeflow.errors import CheckpointError

    huge = torch.full((4, 8), 3e38)
    poisoned = huge.clone()
    poisoned[2, 5] = float("nan")
    path = tmp_path / "w.safetensors"
    save_file({"huge": huge, "poisoned": poisoned}, path)
    with open_checkpoint(path) as reader:
        loaded = load_for_compute(reader, "huge", torch.device("cpu"), torch.float32)
        assert torch.equal(loaded, huge)
        with pytest.raises(
            CheckpointError, match=r"key 'poisoned' holds 1 NaN or Inf value\(s\) of 16"
        ):
            load_for_compute(reader, "poisoned", torch.device("cpu"), torch.float32, rows=(1, 3))


def test_a_folder_holding_model_safetensors_is_refused_before_merging(llamas, tmp_path):
    """from_pretrained reads model.safetensors before an index: new shards beside an old
    model.safetensors would load as the old model."""
    from mergeflow.errors import CheckpointError

    folders, _ = llamas
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "model.safetensors"
    save_file({"x": torch.ones(2)}, stale)
    old = stale.read_bytes()
    with pytest.raises(
        CheckpointError, match=r"out/model\.safetensors: from_pretrained would load"
    ):
        merge_files("task_arithmetic", folders[0], folders[1:], {}, out, device="cpu")
    assert stale.read_bytes() == old
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
