"""Checkpoints on object storage: `--model s3://bucket/prefix/SkyReels-V2-DF-14B-540P-Diffusers` (any fsspec URL),
or a registry card's mirror. A diffusers directory, checked at the door and fetched once per node.

- **Checked at the door.** Before any Ray work the driver reads `model_index.json` and lists the directory once:
  the pipeline must be the one the card's family names, and every component the index lists must be there, a model
  component (one with a `config.json`) with its weights, every shard a weight index names.
- **Fetched once per node** into `$SKYREELS_BATCH_CACHE/checkpoints/`, under a file lock, whatever the number of
  actors on the node: each actor asks for the parts it loads (text-encoder actors: the text encoder, tokenizer and
  scheduler; render actors: everything else), and a part another actor already fetched is not fetched again. A
  part downloads into a staging folder of its own, files in parallel, each checked against the listing's size and,
  where the store's ETag is an MD5, its MD5; then the folder is renamed into place and the part's listing recorded.
  A part is loaded only once recorded, so an interrupted fetch is never loaded: the next fetch keeps the staged
  files that are whole and fetches the rest. A part whose listing has changed on the store is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from skyreels_batch import storage

ROOT = "."  # the directory's own files: model_index.json, the card of an exported embedded model
TEXT_PARTS = ("scheduler", "text_encoder", "tokenizer")  # what the text-encoding stage loads
NOT_RENDERED = ("text_encoder", "tokenizer")  # what render actors leave to the text-encoding stage
TRANSFERS = 8  # files fetched at once


class CheckpointError(ValueError):
    """A checkpoint URL that is not a usable diffusers directory."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the checkpoint directory
    size: int
    etag: str | None  # an MD5 hex digest where the store's ETag is one (a single-part upload)

    @property
    def part(self) -> str:
        return self.path.split("/", 1)[0] if "/" in self.path else ROOT


def cache_root() -> Path:
    return Path(os.environ.get("SKYREELS_BATCH_CACHE", Path.home() / ".cache" / "skyreels-batch"))


def is_remote(model: str) -> bool:
    return "://" in model and not model.startswith("file://")


def list_checkpoint(uri: str) -> dict[str, RemoteFile]:
    fs, root = storage.filesystem(uri)
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    files = {}
    for name, info in found.items():
        if info.get("type") != "file":
            continue
        path = name[len(root.rstrip("/")) + 1 :]
        etag = str(info.get("ETag") or "").strip('"')
        files[path] = RemoteFile(path, int(info["size"]), etag if len(etag) == 32 and "-" not in etag else None)
    return files


def check_checkpoint(uri: str) -> dict:
    """The checkpoint's `model_index.json`, once the directory is found whole; CheckpointError naming what is
    missing otherwise."""
    files = list_checkpoint(uri)
    if not files:
        raise CheckpointError(f"checkpoint {uri}: nothing there (no such prefix)")
    if "model_index.json" not in files:
        raise CheckpointError(f"checkpoint {uri}: no model_index.json, not a diffusers directory")
    index = json.loads(storage.read_bytes(storage.join(uri, "model_index.json")))
    for component in components(index):
        present = {path for path in files if path.startswith(f"{component}/")}
        if not present:
            raise CheckpointError(f"checkpoint {uri}: {component}/ is missing (model_index.json lists it)")
        if f"{component}/config.json" in present:
            _check_weights(uri, component, present)
    return index


def _check_weights(uri: str, component: str, present: set[str]) -> None:
    weights = [path for path in present if path.endswith((".safetensors", ".bin"))]
    if not weights:
        raise CheckpointError(f"checkpoint {uri}: {component}/ has no weights (*.safetensors or *.bin)")
    for weight_index in (path for path in present if path.endswith(".index.json")):
        shards = set(json.loads(storage.read_bytes(storage.join(uri, weight_index)))["weight_map"].values())
        missing = sorted(shard for shard in shards if f"{component}/{shard}" not in present)
        if missing:
            raise CheckpointError(f"checkpoint {uri}: {component}/ lacks {missing[0]} ({len(missing)} of its shards)")


def components(index: dict) -> list[str]:
    """The components `model_index.json` lists (those saved as None are not there)."""
    return [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    ]


def parts_for(names: list[str], text_encoder: bool) -> list[str]:
    """Of a checkpoint's parts (its top-level folders, and ROOT), those a text-encoder actor or a render actor
    loads."""
    if text_encoder:
        return [name for name in names if name == ROOT or name in TEXT_PARTS]
    return [name for name in names if name not in NOT_RENDERED]


@dataclass(frozen=True)
class Fetched:
    directory: Path
    files: int  # fetched by this call: 0 when the node had every part already
    seconds: float


def fetch_checkpoint(uri: str, *, text_encoder: bool) -> Fetched:
    """The local copy of the parts an actor loads, fetched unless this node has them (see the module docstring)."""
    started = time.perf_counter()
    local = cache_root() / "checkpoints" / _local_name(uri)
    local.mkdir(parents=True, exist_ok=True)
    fetched = 0
    with storage.local_lock(local.with_name(f"{local.name}.lock")):
        listing = list_checkpoint(uri)
        for part in parts_for(sorted({file.part for file in listing.values()}), text_encoder):
            files = sorted((file for file in listing.values() if file.part == part), key=lambda file: file.path)
            if _recorded(local, part) != _fingerprint(files):
                fetched += _fetch_part(uri, local, part, files)
    return Fetched(local, fetched, time.perf_counter() - started)


def _fetch_part(uri: str, local: Path, part: str, files: list[RemoteFile]) -> int:
    staging = local / f".staging-{_file_name(part)}"
    fs, root = storage.filesystem(uri)
    missing = [file for file in files if not _whole(staging / file.path, file)]

    def fetch(file: RemoteFile) -> None:
        target = staging / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.partial")
        fs.get_file(f"{root.rstrip('/')}/{file.path}", str(partial))
        if not _whole(partial, file):
            raise OSError(f"checkpoint {uri}: {file.path} arrived damaged (size or MD5 differs from the listing)")
        os.replace(partial, target)

    with ThreadPoolExecutor(max_workers=TRANSFERS) as pool:
        list(pool.map(fetch, missing))
    _record(local, part, None)
    if part == ROOT:
        for file in files:
            os.replace(staging / file.path, local / file.path)
        shutil.rmtree(staging)
    else:
        shutil.rmtree(local / part, ignore_errors=True)
        os.replace(staging / part, local / part)
        shutil.rmtree(staging)
    _record(local, part, _fingerprint(files))
    return len(missing)


def _whole(path: Path, file: RemoteFile) -> bool:
    if not path.is_file() or path.stat().st_size != file.size:
        return False
    return file.etag is None or _md5(path) == file.etag


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(files: list[RemoteFile]) -> list[list]:
    return [[file.path, file.size, file.etag] for file in files]


def _file_name(part: str) -> str:
    """A part as part of a local file name (ROOT is `.`)."""
    return part.strip(".") or "root"


def _record_path(local: Path, part: str) -> Path:
    return local / ".parts" / f"{_file_name(part)}.json"


def _recorded(local: Path, part: str) -> object:
    path = _record_path(local, part)
    return json.loads(path.read_text()) if path.is_file() else None


def _record(local: Path, part: str, fingerprint: list | None) -> None:
    """The part's listing once it is in place; None (the record removed) while it is being replaced."""
    path = _record_path(local, part)
    if fingerprint is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(exist_ok=True)
    staging = path.with_name(f"{path.name}.partial")
    staging.write_text(json.dumps(fingerprint))
    os.replace(staging, path)


def _local_name(uri: str) -> str:
    return f"{uri.rstrip('/').rsplit('/', 1)[-1]}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def check_hub_cache(repo_id: str) -> None:
    """With HF_HUB_OFFLINE set, a Hub checkpoint must already be in the local HuggingFace cache: say so at the door
    rather than in every actor. (Read from the environment here: huggingface_hub reads it once, at import.)"""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() not in ("1", "ON", "YES", "TRUE"):
        return
    from huggingface_hub import try_to_load_from_cache

    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    cache = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    if not isinstance(try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache), str):
        raise CheckpointError(f"checkpoint {repo_id}: not in the HuggingFace cache and HF_HUB_OFFLINE is set ({cache})")
