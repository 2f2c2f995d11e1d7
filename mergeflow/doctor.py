"""``mergeflow doctor``: is each store reachable and writable, and is the stack the pinned one?

Each check writes a small probe where a run would write (and removes it), so a missing
bucket, a read-only folder or an unreachable tracking server shows here, in one line that
names it, rather than an hour into a run.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mergeflow.storage import filesystem, is_remote, local_path
from mergeflow.stores import Stores

# the packages whose versions change what a run computes or can read
KEY_PACKAGES = (
    "torch",
    "open_clip_torch",
    "transformers",
    "peft",
    "safetensors",
    "prefect",
    "mlflow",
    "s3fs",
    "datasets",
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def _probe(uri: str) -> None:
    """Write a small object under ``uri`` (a folder or prefix) and remove it."""
    name = f".mergeflow-doctor-{uuid.uuid4().hex}"
    if not is_remote(uri):
        folder = local_path(uri)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / name
        probe.write_bytes(b"ok")
        probe.unlink()
        return
    fs, root = filesystem(uri)
    target = f"{root.rstrip('/')}/{name}"
    with fs.open(target, "wb") as f:
        f.write(b"ok")
    fs.rm(target)


def check_writable(name: str, uri: str) -> Check:
    try:
        _probe(uri)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding, named
        return Check(name, False, f"{uri}: cannot write there ({type(exc).__name__}: {exc})")
    return Check(name, True, f"{uri} (writable)")


def check_tracking(uri: str) -> Check:
    """The tracking store answers (a local database is created if need be)."""
    try:
        if uri.startswith("sqlite:///"):
            _probe(str(Path(uri.removeprefix("sqlite:///")).parent))
        import logging

        import mlflow

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "creating tables"
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Check("tracking", False, f"{uri}: not reachable ({type(exc).__name__}: {first})")
    return Check("tracking", True, f"{uri} (answers)")


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by normalized name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normal(name)] = version.strip()
    return pins


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def check_versions(pins_file: Path | None) -> Check:
    if pins_file is None or not pins_file.is_file():
        return Check("versions", True, "no constraints.txt beside the code: pins not checked")
    pins = read_pins(pins_file)
    differ = []
    for package in KEY_PACKAGES:
        pinned = pins.get(_normal(package))
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = None
        if pinned is not None and installed != pinned:
            differ.append(f"{package} {installed or 'not installed'} (pinned {pinned})")
    if differ:
        return Check("versions", False, ", ".join(differ) + f"; pins: {pins_file}")
    return Check("versions", True, f"{len(KEY_PACKAGES)} key packages as pinned in {pins_file}")


def default_pins_file() -> Path | None:
    """``constraints.txt`` of the checkout this code runs from, if there is one."""
    path = Path(__file__).resolve().parent.parent / "constraints.txt"
    return path if path.is_file() else None


def diagnose(stores: Stores, pins_file: Path | None = None) -> list[Check]:
    """Every check, in the order a run needs them."""
    checks = [
        check_writable("cache", stores.cache),
        check_writable("result store", stores.result_store),
        check_tracking(stores.tracking_uri),
    ]
    if stores.artifact_root != "the tracking server's":
        checks.append(check_writable("artifacts", stores.artifact_root))
    checks.append(check_versions(pins_file))
    return checks
