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


def test_digests_are_the_sha256_of_the_bytes_local_or_fetched(tower, bucket, cache, tmp_path):
    import hashlib

    local = tmp_path / "tower.safetensors"
    save_state_dict(tower, local)
    expected = hashlib.sha256(local.read_bytes()).hexdigest()
    copy = cache.fetch(local)
    assert copy.sha256 is None and copy.path == local  # a local file is read in place
    assert copy.digest() == expected
    uri = f"s3://{bucket}/digest/tower.safetensors"
    boto3.client("s3").put_object(
        Bucket=bucket, Key="digest/tower.safetensors", Body=local.read_bytes()
    )
    fetched = cache.fetch(uri)
    assert fetched.sha256 == fetched.digest() == expected


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
    assert (second.uri, second.size, second.etag) == (uri, first.size, first.etag)
    assert second.path.name == "tower.safetensors"  # the object's own name, for readers
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


def test_a_cache_entry_whose_file_is_gone_is_fetched_again(tower, bucket, cache):
    uri = f"s3://{bucket}/gone.safetensors"
    save_state_dict(tower, uri)
    first = cache.fetch(uri)
    first.path.unlink()  # its entry.json stays
    second = cache.fetch(uri)
    assert not second.from_cache and second.sha256 == first.sha256


def test_local_files_are_read_in_place_and_folders_refused(tower, cache, tmp_path):
    from mergeflow.storage import NotAFileError

    path = tmp_path / "tower.safetensors"
    save_state_dict(tower, path)
    copy = cache.fetch(path)
    assert (copy.path, copy.size, copy.from_cache) == (path, path.stat().st_size, False)
    with pytest.raises(NotAFileError, match=f"^{tmp_path}: is a folder, not a file$"):
        cache.fetch(tmp_path)
    with pytest.raises(CheckpointError, match="no-such.safetensors: no such file$"):
        cache.fetch(tmp_path / "no-such.safetensors")


def test_etags_are_read_unquoted_whatever_the_filesystem_calls_them(tmp_path):
    import fsspec

    from mergeflow.storage import _etag_is_not_an_md5, _etag_of

    assert _etag_of({"ETag": '"abc"'}) == "abc"
    assert _etag_of({"etag": '"def"'}) == "def"  # fsspec stores other than s3fs
    assert _etag_of({"size": 3}) is None
    assert _etag_is_not_an_md5(fsspec.filesystem("file"), str(tmp_path)) is False  # not S3


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


def test_a_cache_file_corrupted_in_place_with_its_mtime_kept_is_fetched_again(tower, bucket, cache):
    import os

    uri = f"s3://{bucket}/kept-mtime.safetensors"
    save_state_dict(tower, uri)
    first = cache.fetch(uri)
    before = first.path.stat()
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    first.path.write_bytes(bytes(data))
    os.utime(first.path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime as it was
    assert first.path.stat().st_mtime_ns == before.st_mtime_ns
    again = cache.fetch(uri)
    assert not again.from_cache and again.sha256 == first.sha256
    assert_same(load_state_dict(uri, cache), tower)


def test_a_truncated_cache_file_is_fetched_again(tower, bucket, cache):
    uri = f"s3://{bucket}/truncated.safetensors"
    save_state_dict(tower, uri)
    first = cache.fetch(uri)
    first.path.write_bytes(first.path.read_bytes()[:-100])
    again = cache.fetch(uri)
    assert not again.from_cache and again.size == first.size
    assert again.path.read_bytes()[-100:] != b""


def test_an_untouched_cache_file_is_trusted_by_its_fingerprint(tower, bucket, cache, monkeypatch):
    import os

    from mergeflow import storage

    uri = f"s3://{bucket}/untouched.safetensors"
    save_state_dict(tower, uri)
    first = cache.fetch(uri)
    hashed = []
    real = storage.file_sha256
    monkeypatch.setattr(storage, "file_sha256", lambda path: hashed.append(path) or real(path))
    assert cache.fetch(uri).from_cache and hashed == []  # nothing changed: not read again
    os.utime(first.path)  # a touch changes the fingerprint: read and hashed once
    assert cache.fetch(uri).from_cache and len(hashed) == 1
    assert cache.fetch(uri).from_cache and len(hashed) == 1  # and trusted again after that


def _flip_a_bit(data: bytearray, start: int, total: int) -> bytearray:
    if len(data) > 1000:  # an object's body, not an error document
        data[len(data) // 2] ^= 0x01
    return data


def _lose_the_tail(data: bytearray, start: int, total: int) -> bytearray:
    return data[: max(0, total - 100 - start)]  # as if the object ended 100 bytes early


class _CorruptingProxy:
    """A real HTTP hop between the client and the S3 server that damages every object body
    it passes on (``mangle(body, first byte, object size)``), as a faulty network path
    might."""

    def __init__(self, upstream: str, mangle=_flip_a_bit, header=None, extra_headers=None):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        target = urlparse(upstream)

        class Handler(BaseHTTPRequestHandler):
            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(target.hostname, target.port)
                sent = dict(self.headers)
                if header is not None:
                    # the client asks for the ETag this hop made up; the server knows its own
                    sent = {k: v for k, v in sent.items() if k.lower() != "if-match"}
                connection.request(self.command, self.path, body, sent)
                reply = connection.getresponse()
                data = bytearray(reply.read())
                if self.command == "GET" and reply.status in (200, 206):
                    span = (
                        reply.getheader("Content-Range") or f"bytes 0-{len(data) - 1}/{len(data)}"
                    )
                    first, total = int(span.split()[1].split("-")[0]), int(span.split("/")[1])
                    data = mangle(data, first, total)
                self.send_response(reply.status)
                for name, value in reply.getheaders():
                    if name.lower() in ("content-length", "content-range"):
                        continue
                    # without the server's own checksums (objects stored before S3 had
                    # them, or stores that send none) the MD5 ETag is what is left to check
                    lower = name.lower()
                    if lower not in ("transfer-encoding", "connection") and not lower.startswith(
                        "x-amz-checksum"
                    ):
                        self.send_header(*(header(name, value) if header else (name, value)))
                for name, value in (extra_headers or {}).items():
                    self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                    if reply.status == 206:
                        total = reply.getheader("Content-Range").split("/")[1]
                        first = int(reply.getheader("Content-Range").split()[1].split("-")[0])
                        self.send_header(
                            "Content-Range", f"bytes {first}-{first + len(data) - 1}/{total}"
                        )
                else:
                    self.send_header("Content-Length", reply.getheader("Content-Length") or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(bytes(data))

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _relay

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_a_download_that_does_not_match_its_md5_etag_is_refused(
    tower, bucket, cache, s3_endpoint, monkeypatch
):
    uri = f"s3://{bucket}/through-a-bad-hop.safetensors"
    save_state_dict(tower, uri)
    proxy = _CorruptingProxy(s3_endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(
            CheckpointError, match=r"through-a-bad-hop.*do not match the .*ETag"
        ) as refused:
            cache.fetch(uri)
        assert refused.value.transient  # a retry may get the right bytes
    finally:
        proxy.close()
    entries = list((cache.root / "objects").rglob("*"))
    assert not [p for p in entries if p.is_file()]  # nothing kept from the bad download
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert_same(load_state_dict(uri, cache), tower)
    assert len([p for p in (cache.root / "objects").rglob("*.safetensors") if p.is_file()]) == 1


@pytest.mark.parametrize(
    "encryption",
    [
        {"x-amz-server-side-encryption": "aws:kms"},
        {"x-amz-server-side-encryption-customer-algorithm": "AES256"},
    ],
    ids=["sse-kms", "sse-c"],
)
def test_an_encrypted_object_is_not_checked_against_its_etag(
    tower, bucket, cache, s3_endpoint, monkeypatch, encryption
):
    # S3 gives SSE-KMS and SSE-C objects an ETag that is not the MD5 of their bytes: checking
    # it would refuse every such object; the SHA-256 computed while downloading still
    # identifies it
    uri = f"s3://{bucket}/encrypted.safetensors"
    save_state_dict(tower, uri)

    def as_kms(name, value):
        if name.lower() == "etag":
            return "ETag", '"0123456789abcdef0123456789abcdef"'
        return name, value

    proxy = _CorruptingProxy(
        s3_endpoint,
        mangle=lambda data, first, total: data,
        header=as_kms,
        extra_headers=encryption,
    )
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        copy = cache.fetch(uri)
    finally:
        proxy.close()
    assert copy.etag == "0123456789abcdef0123456789abcdef"
    assert_same(load_state_dict(copy.path), tower)


def test_a_short_download_of_a_multipart_object_is_refused(bucket, cache, s3_endpoint, monkeypatch):
    """A multipart object's ETag is no MD5 of its bytes: its size is what is left to check."""
    from boto3.s3.transfer import TransferConfig

    from mergeflow.storage import _MD5_ETAG

    big = {"w": torch.randn(3_000_000, generator=torch.Generator().manual_seed(0))}  # 12 MB
    local = cache.root.parent / "big.safetensors"
    save_state_dict(big, local)
    boto3.client("s3").upload_file(
        str(local),
        bucket,
        "big.safetensors",
        Config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20),
    )
    uri = f"s3://{bucket}/big.safetensors"
    etag = boto3.client("s3").head_object(Bucket=bucket, Key="big.safetensors")["ETag"]
    assert not _MD5_ETAG.match(etag.strip('"'))  # "…-3": not an MD5
    proxy = _CorruptingProxy(s3_endpoint, _lose_the_tail)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(CheckpointError, match=r"big\.safetensors: download truncated") as cut:
            cache.fetch(uri)
        assert cut.value.transient
    finally:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert_same(load_state_dict(uri, cache), big)


def test_cart_factors_load_from_s3_into_the_given_cache(tower, bucket, cache):
    from conftest import finetune_like

    from mergeflow.cart_grid import CartFactors

    factors = CartFactors.factorize(finetune_like(tower, 2), max_rank_ratio=0.25, device="cpu")
    uri = f"s3://{bucket}/grid/factors.safetensors"
    factors.save(uri)
    loaded = CartFactors.load(uri, cache)
    assert len(list((cache.root / "objects").rglob("factors.safetensors"))) == 1
    a, b = factors.merge(0.2, device="cpu"), loaded.merge(0.2, device="cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)
