import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from mergeflow import CheckpointError
from mergeflow.checkpoints import load_state_dict, open_checkpoint, save_state_dict
from mergeflow.storage import CheckpointCache


@pytest.fixture
def cache(tmp_path):
    return CheckpointCache(tmp_path / "cache")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_safetensors_round_trip_is_lazy_and_exact(tower, tmp_path, cache):
    path = tmp_path / "tower.safetensors"
    save_state_dict(tower, path, {"note": "hello"})
    with open_checkpoint(path, cache) as reader:
        layout = reader.layout()
        assert layout["visual.proj"] == ((32, 16), torch.float32)
        assert reader.metadata()["note"] == "hello"
        assert torch.equal(reader.get("visual.proj"), tower["visual.proj"])
    assert_same(load_state_dict(f"file://{path}", cache), tower)
    assert not list(tmp_path.glob(".partial-*")), "no temporary file left behind"


def test_reader_agrees_with_safetensors_on_every_dtype(tmp_path, cache):
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(0)
    state = {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 2, 2, generator=gen).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    assert_same(load_state_dict(path, cache), load_file(str(path)))


def test_torch_files_are_normalized(tower, tmp_path, cache):
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tower.items()}}
    path = tmp_path / "ckpt.pt"
    torch.save(wrapped, path)
    assert_same(load_state_dict(path, cache), tower)


def test_legacy_torch_format_loads(tower, tmp_path, cache):
    path = tmp_path / "legacy.pt"
    torch.save(tower, path, _use_new_zipfile_serialization=False)
    assert_same(load_state_dict(path, cache), tower)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused"):
        load_state_dict(path, cache)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_non_tensor_entry_is_named(tmp_path, cache):
    path = tmp_path / "odd.pt"
    torch.save({"w": torch.zeros(2), "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match=r"odd\.pt.*'lr'.*not a tensor"):
        load_state_dict(path, cache)


def test_empty_and_garbage_files_are_named(tmp_path, cache):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors: empty file"):
        open_checkpoint(tmp_path / "empty.safetensors", cache)
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.bin: neither"):
        open_checkpoint(tmp_path / "junk.bin", cache)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: no such file"):
        open_checkpoint(tmp_path / "missing.safetensors", cache)


def test_truncated_safetensors_is_named(tower, tmp_path, cache):
    path = tmp_path / "cut.safetensors"
    save_file(tower, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_state_dict(path, cache)


def test_sharded_safetensors_index(tower, tmp_path, cache):
    keys = list(tower)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    weight_map = {}
    for shard, shard_keys in shards.items():
        save_file({k: tower[k] for k in shard_keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in shard_keys})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_checkpoint(index, cache) as reader:
        assert list(reader.layout()) == keys
        assert reader.shard_files == list(shards)
        assert [c.path.name for c in reader.files] == [index.name, *shards]
    assert_same(load_state_dict(index, cache), tower)


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.safetensors"
    shared = torch.zeros(4)
    with pytest.raises(CheckpointError, match=r"out\.safetensors"):
        save_state_dict({"a": shared, "b": shared}, target)  # safetensors refuses shared memory
    assert not target.exists()
    assert not list(tmp_path.iterdir())


def test_pickle_module_is_not_needed_for_safetensors(tower, tmp_path, cache, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_state_dict(tower, path)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickled while reading safetensors")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    assert_same(load_state_dict(path, cache), tower)


def test_safetensors_whose_header_length_starts_with_a_pickle_mark(tmp_path):
    """A header length of 0x..80 puts 0x80 (a pickle's first byte) at the start of the file;
    it is still read as safetensors, metadata included."""
    import struct

    path = tmp_path / "odd.safetensors"
    for pad in range(300):
        save_state_dict({"w": torch.ones(2)}, path, {"note": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    assert path.read_bytes()[:1] == b"\x80"
    with open_checkpoint(path) as reader:
        assert reader.metadata()["note"] == "x" * pad
        torch.testing.assert_close(reader.get("w"), torch.ones(2))
