"""Checkpoint I/O against a real S3 HTTP endpoint (moto's server on 127.0.0.1)."""

import boto3
import pytest
import torch

from mergeflow import CheckpointError
from mergeflow.checkpoints import load_state_dict, open_checkpoint, save_state_dict
from mergeflow.storage import CheckpointCache


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def cache(tmp_path):
    return CheckpointCache(tmp_path / "cache")


def test_write_then_read_back(tower, bucket, cache):
    uri = f"s3://{bucket}/models/tower.safetensors"
    save_state_dict(tower, uri, {"origin": "test"})
    head = boto3.client("s3").head_object(Bucket=bucket, Key="models/tower.safetensors")
    assert head["ContentLength"] > 0
    with open_checkpoint(uri, cache) as reader:
        assert reader.metadata()["origin"] == "test"
        copy = reader.files[0]
        assert copy.etag == head["ETag"].strip('"') and not copy.from_cache
        assert len(copy.sha256) == 64
        assert_same(reader.to_state_dict(), tower)


def test_second_fetch_transfers_no_bytes(tower, bucket, cache, monkeypatch):
    uri = f"s3://{bucket}/tower.safetensors"
    save_state_dict(tower, uri)
    first = cache.fetch(uri)
    assert not first.from_cache

    import s3fs

    def no_download(*args, **kwargs):
        raise AssertionError("the cache downloaded again")

    monkeypatch.setattr(s3fs.S3FileSystem, "open", no_download)
    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", no_download)
    second = cache.fetch(uri)
    assert second.from_cache and second.path == first.path and second.sha256 == first.sha256
    assert_same(load_state_dict(uri, cache), tower)


def test_changed_object_is_fetched_again(tower, bucket, cache):
    uri = f"s3://{bucket}/tower.safetensors"
    save_state_dict(tower, uri)
    first = cache.fetch(uri)
    changed = {k: v + 1 for k, v in tower.items()}
    save_state_dict(changed, uri)
    second = cache.fetch(uri)
    assert not second.from_cache and second.etag != first.etag
    assert_same(load_state_dict(uri, cache), changed)


def test_corrupted_cache_entry_is_fetched_again(tower, bucket, cache):
    uri = f"s3://{bucket}/tower.safetensors"
    save_state_dict(tower, uri)
    first = cache.fetch(uri)
    data = bytearray(first.path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    first.path.write_bytes(bytes(data))
    second = cache.fetch(uri)
    assert not second.from_cache
    assert second.path.read_bytes() != bytes(data)
    assert_same(load_state_dict(uri, cache), tower)


def test_missing_key_and_bucket_are_named(bucket, cache):
    with pytest.raises(CheckpointError, match=rf"s3://{bucket}/nope\.safetensors: no such"):
        cache.fetch(f"s3://{bucket}/nope.safetensors")
    with pytest.raises(CheckpointError, match=r"s3://no-such-bucket-here/x\.safetensors"):
        cache.fetch("s3://no-such-bucket-here/x.safetensors")


def test_torch_file_over_s3(tower, bucket, cache, tmp_path):
    local = tmp_path / "ckpt.pt"
    torch.save({"state_dict": tower}, local)
    boto3.client("s3").upload_file(str(local), bucket, "ckpt.pt")
    assert_same(load_state_dict(f"s3://{bucket}/ckpt.pt", cache), tower)
