"""Files wherever they live: local paths, ``file://`` and ``s3://`` URIs (any fsspec protocol).

Remote objects are fetched into a local cache keyed by URI + ETag, so a second fetch of an
unchanged object transfers no bytes (one metadata request only). Downloads land atomically:
they stream into a temporary file beside the target, are checked against the remote size and,
where the ETag is a plain MD5, against it, and only then are renamed into place. A cache
entry is used only if its file still holds what was downloaded: the size must match, and the
content is hashed again (SHA-256) unless the file's fingerprint (inode, size, mtime and
ctime, see :func:`fingerprint`) is the one recorded when it was last verified; a file that
no longer matches is fetched again.

S3 honours the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``) and ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` for MinIO or a local server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.core import split_protocol

from mergeflow.errors import CheckpointError

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 1024 * 1024
LOCAL_PROTOCOLS = (None, "file", "local")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


def is_remote(uri: str | os.PathLike) -> bool:
    protocol, _ = split_protocol(str(uri))
    return protocol not in LOCAL_PROTOCOLS


def local_path(uri: str | os.PathLike) -> Path:
    """The filesystem path of a local path or ``file://`` URI."""
    protocol, path = split_protocol(str(uri))
    if protocol not in LOCAL_PROTOCOLS:
        raise ValueError(f"{uri} is not a local path")
    return Path(path)


def s3_options() -> dict:
    """s3fs options from the environment. Credentials are left to botocore's own chain so
    they never pass through mergeflow's code or logs."""
    options: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it."""
    protocol, path = split_protocol(str(uri))
    if protocol in LOCAL_PROTOCOLS:
        return fsspec.filesystem("file"), path
    options = s3_options() if protocol in ("s3", "s3a") else {}
    return fsspec.filesystem(protocol, **options), path


def default_cache_dir() -> Path:
    """``$MERGEFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/mergeflow``, else ``~/.cache/mergeflow``."""
    if os.environ.get("MERGEFLOW_CACHE_DIR"):
        return Path(os.environ["MERGEFLOW_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mergeflow"


def fingerprint(stat: os.stat_result) -> list[int]:
    """What says a file is untouched without reading it: its inode, size, mtime and ctime.
    mtime alone is not enough (``os.utime`` sets it back after a write); ctime changes on
    every write, ``utime``, ``chmod`` or rename, and no process can set it."""
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


# (path, fingerprint) → sha256: hashing a local checkpoint once per process, not per use
_LOCAL_DIGESTS: dict[tuple, str] = {}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the local file at ``path``, remembered by its :func:`fingerprint`.

    A digest is kept in the process and, across runs, in ``digests/`` under
    :func:`default_cache_dir` (git's index trusts a file's stat the same way): merging the
    same 3 GiB of checkpoints again costs no 4 s of hashing. A file whose fingerprint
    changed, by any write, ``utime``, ``chmod`` or rename, is read and hashed again.
    """
    real = os.path.realpath(path)
    memo_key = (real, *fingerprint(os.stat(real)))
    if memo_key in _LOCAL_DIGESTS:
        return _LOCAL_DIGESTS[memo_key]
    digest = _recalled_digest(memo_key)
    if digest is None:
        digest = _hash_file(real)
        if (real, *fingerprint(os.stat(real))) == memo_key:  # not written to while hashed
            _remember_digest(memo_key, digest)
    _LOCAL_DIGESTS[memo_key] = digest
    return digest


def file_sha256s(paths: list[str | os.PathLike]) -> list[str]:
    """:func:`file_sha256` of each path, hashed on up to one thread per core (hashlib
    releases the GIL while it hashes, so 9 checkpoints take half the time on two cores)."""
    if len(paths) < 2:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def _hash_file(path: str) -> str:
    digest, buffer = hashlib.sha256(), bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _memo_file(memo_key: tuple) -> Path:
    name = hashlib.sha256(json.dumps(memo_key).encode()).hexdigest()
    return default_cache_dir() / "digests" / name[:2] / name


def _recalled_digest(memo_key: tuple) -> str | None:
    try:
        memo = json.loads(_memo_file(memo_key).read_text())
        if memo["file"] == list(memo_key) and _SHA256.match(memo["sha256"]):
            return memo["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo, or one this version cannot read: hash the file
    return None


def _remember_digest(memo_key: tuple, digest: str) -> None:
    try:
        body = json.dumps({"file": list(memo_key), "sha256": digest}).encode()
        atomic_write_bytes(_memo_file(memo_key), body)
    except OSError as exc:  # a read-only cache only costs hashing again next run
        log.debug("cannot remember the digest of %s: %s", memo_key[0], exc)


@dataclass(frozen=True)
class LocalCopy:
    """A file readable on this machine for ``uri``.

    ``sha256`` is known for fetched objects (computed while downloading); for local files it
    is None until :meth:`digest` computes it.
    """

    uri: str
    path: Path
    size: int
    etag: str | None = None
    sha256: str | None = None
    from_cache: bool = False

    def digest(self) -> str:
        return self.sha256 or file_sha256(self.path)


def _remote_info(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> dict:
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no such file or object") from None
    except PermissionError as exc:
        raise CheckpointError(f"{uri}: access denied ({exc})") from None
    except Exception as exc:  # botocore's credential and connection errors are not OSErrors
        missing_credentials = "Credentials" in type(exc).__name__
        raise CheckpointError(
            f"{uri}: cannot read object metadata: {type(exc).__name__}: {exc}",
            transient=not missing_credentials,
        ) from None
    if info.get("type") == "directory":
        raise NotAFileError(f"{uri}: is a folder, not a file")
    return info


def _etag_is_not_an_md5(fs: fsspec.AbstractFileSystem, rpath: str) -> bool:
    """Whether S3 made this object's ETag from something other than the MD5 of its bytes:
    objects encrypted with SSE-KMS or a customer key (SSE-C). s3fs's ``info`` drops the
    encryption headers, so they are asked for, only when an ETag did not match; a store
    that is not S3 has no such objects."""
    if not hasattr(fs, "call_s3"):
        return False
    bucket, key, _ = fs.split_path(rpath)
    head = fs.call_s3("head_object", Bucket=bucket, Key=key)
    kms = str(head.get("ServerSideEncryption")).startswith("aws:kms")
    return kms or "SSECustomerAlgorithm" in head


def _etag_of(info: dict) -> str | None:
    etag = info.get("ETag") or info.get("etag")
    return etag.strip('"') if isinstance(etag, str) else None


class NotAFileError(CheckpointError):
    """The URI names a folder (a local directory or an object-store prefix)."""


class CheckpointCache:
    """A local cache of remote files, one entry per (URI, ETag)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def fetch(self, uri: str | os.PathLike) -> LocalCopy:
        """A local copy of ``uri``: the file itself when local, else a verified cached copy."""
        uri = str(uri)
        if not is_remote(uri):
            path = local_path(uri)
            if path.is_dir():
                raise NotAFileError(f"{uri}: is a folder, not a file")
            if not path.is_file():
                raise CheckpointError(f"{uri}: no such file")
            return LocalCopy(uri=uri, path=path, size=path.stat().st_size)

        fs, rpath = filesystem(uri)
        info = _remote_info(fs, rpath, uri)
        etag = _etag_of(info)
        version = etag or f"{info.get('size')}-{info.get('LastModified') or info.get('mtime')}"
        key = hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:40]
        entry = self.root / "objects" / key
        target = entry / (Path(rpath).name or "object")
        cached = self._valid_entry(entry, target)
        if cached is not None:
            log.debug("cache hit for %s", uri)
            return LocalCopy(uri, target, cached["size"], etag, cached["sha256"], from_cache=True)
        sha256 = self._download(fs, rpath, uri, info, etag, entry, target)
        return LocalCopy(uri, target, int(info["size"]), etag, sha256, from_cache=False)

    def list_folder(self, uri: str | os.PathLike) -> list[str]:
        """Names of the files directly inside the folder ``uri`` (local or remote), sorted."""
        uri = str(uri)
        if not is_remote(uri):
            path = local_path(uri)
            if not path.is_dir():
                raise CheckpointError(f"{uri}: no such folder")
            return sorted(p.name for p in path.iterdir() if p.is_file())
        fs, rpath = filesystem(uri)
        try:
            fs.invalidate_cache(rpath)
            entries = fs.ls(rpath.rstrip("/"), detail=True)
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: no such folder") from None
        except PermissionError as exc:
            raise CheckpointError(f"{uri}: access denied ({exc})") from None
        except Exception as exc:
            raise CheckpointError(
                f"{uri}: cannot list the folder: {type(exc).__name__}: {exc}", transient=True
            ) from None
        return sorted(
            posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file"
        )

    def _valid_entry(self, entry: Path, target: Path) -> dict | None:
        meta_path = entry / "entry.json"
        if not (meta_path.is_file() and target.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        stat = target.stat()
        if stat.st_size != meta.get("size"):
            log.warning("cached %s has the wrong size; fetching it again", meta.get("uri"))
            return None
        if fingerprint(stat) == meta.get("fingerprint"):
            return meta  # untouched since it was verified (see fingerprint)
        if file_sha256(target) != meta.get("sha256"):
            log.warning(
                "cached %s no longer matches its digest; fetching it again", meta.get("uri")
            )
            return None
        # verified by content: the next use may trust the file's fingerprint again
        meta["fingerprint"] = fingerprint(stat)
        atomic_write_bytes(entry / "entry.json", json.dumps(meta).encode())
        return meta

    def _download(self, fs, rpath, uri, info, etag, entry: Path, target: Path) -> str:
        entry.mkdir(parents=True, exist_ok=True)
        expected_size = int(info["size"])
        fd, tmp = tempfile.mkstemp(dir=entry, prefix=".partial-")
        sha256, md5, received = hashlib.sha256(), hashlib.md5(), 0
        try:
            with os.fdopen(fd, "wb") as out, fs.open(rpath, "rb", block_size=CHUNK_BYTES) as src:
                while chunk := src.read(CHUNK_BYTES):
                    out.write(chunk)
                    sha256.update(chunk)
                    md5.update(chunk)
                    received += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if received != expected_size:
                raise CheckpointError(
                    f"{uri}: download truncated ({received} of {expected_size} bytes)",
                    transient=True,
                )
            if (
                etag
                and _MD5_ETAG.match(etag)
                and md5.hexdigest() != etag
                and not _etag_is_not_an_md5(fs, rpath)
            ):
                raise CheckpointError(
                    f"{uri}: downloaded bytes do not match the object's ETag", transient=True
                )
            os.replace(tmp, target)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{uri}: download failed: {type(exc).__name__}: {exc}", transient=True
            ) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = {
            "uri": uri,
            "etag": etag,
            "size": expected_size,
            "sha256": sha256.hexdigest(),
            "fingerprint": fingerprint(target.stat()),
        }
        atomic_write_bytes(entry / "entry.json", json.dumps(meta).encode())
        log.info("fetched %s (%d bytes)", uri, expected_size)
        return meta["sha256"]


def current_umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staged_output(uri: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary local path to write; on success it is placed at ``uri`` whole.

    Local targets get a rename from beside them (atomic on one filesystem); remote ones an
    upload (an object appears whole or not at all). On failure nothing is left at ``uri``.
    """
    uri = str(uri)
    remote = is_remote(uri)
    if remote:
        staging_dir = Path(tempfile.gettempdir())
        suffix = Path(split_protocol(uri)[1]).suffix
    else:
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging_dir, suffix = target.parent, target.suffix
    fd, tmp = tempfile.mkstemp(dir=staging_dir, prefix=".partial-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if not remote:
            os.chmod(tmp, 0o666 & ~current_umask())  # as open() would have made it
            os.replace(tmp, target)
            return
        fs, rpath = filesystem(uri)
        try:
            fs.put_file(tmp, rpath)
        except Exception as exc:
            raise CheckpointError(
                f"{uri}: upload failed: {type(exc).__name__}: {exc}", transient=True
            ) from exc
        finally:
            fs.invalidate_cache(rpath)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
