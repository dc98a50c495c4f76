"""Opening the manifest on the driver: find its Parquet files and check what only a whole-manifest view can
(an `id` column exists, ids are unique) by reading the `id` column alone."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from skyreels_batch import storage
from skyreels_batch.schema import ManifestRow

GLOB_CHARACTERS = set("*?[")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing, unreadable, no `id` column)."""


@dataclass(frozen=True)
class Manifest:
    fs: fsspec.AbstractFileSystem
    files: list[str]
    schema: pa.Schema  # of all files together: a column missing from a file is null for its rows
    num_rows: int
    columns: list[str]
    unknown_columns: list[str]
    duplicate_ids: frozenset[str]


def open_manifest(uri: str) -> Manifest:
    fs, path = storage.filesystem(storage.normalize(uri))
    files = _parquet_files(fs, path, uri)
    try:
        dataset = _dataset(files, fs)
        if "id" not in dataset.schema.names:
            raise ManifestError(f"manifest {uri} has no 'id' column (columns: {', '.join(dataset.schema.names)})")
        ids = dataset.to_table(columns=["id"]).column("id")
    except (pa.ArrowException, OSError) as error:
        raise ManifestError(f"cannot read manifest {uri}: {error}") from None
    counts = pc.value_counts(ids.drop_null())
    duplicates = frozenset(
        item["values"] for item in counts.to_pylist() if item["counts"] > 1 and isinstance(item["values"], str)
    )
    known = set(ManifestRow.model_fields)
    return Manifest(
        fs=fs,
        files=files,
        schema=dataset.schema,
        num_rows=len(ids),
        columns=[name for name in dataset.schema.names if name in known],
        unknown_columns=[name for name in dataset.schema.names if name not in known],
        duplicate_ids=duplicates,
    )


def read_batches(manifest: Manifest) -> Iterator[pa.RecordBatch]:
    """The manifest's known columns, a record batch at a time (the driver-side path: --dry-run)."""
    dataset = pads.dataset(
        manifest.files, schema=manifest.schema, filesystem=storage.arrow_filesystem(manifest.fs), format="parquet"
    )
    yield from dataset.to_batches(columns=manifest.columns)


def _dataset(files: list[str], fs: fsspec.AbstractFileSystem) -> pads.Dataset:
    """All files as one dataset. Arrow takes the first file's schema unless told otherwise, which would drop the
    columns only later files have (a folder that grows night by night gains columns), so the schemas are unified:
    one footer read per file."""
    dataset = pads.dataset(files, filesystem=storage.arrow_filesystem(fs), format="parquet")
    schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
    return pads.dataset(
        files,
        schema=pa.unify_schemas(schemas, promote_options="permissive"),
        filesystem=storage.arrow_filesystem(fs),
        format="parquet",
    )


def _parquet_files(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> list[str]:
    try:
        if GLOB_CHARACTERS & set(path):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(name for name in fs.find(path) if name.endswith(".parquet"))
        elif fs.isfile(path):
            files = [path]
        else:
            raise ManifestError(f"manifest {uri} does not exist")
    except (OSError, PermissionError) as error:
        raise ManifestError(f"cannot list manifest {uri}: {error}") from None
    if not files:
        raise ManifestError(f"manifest {uri} matches no Parquet files")
    return files


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as a Parquet manifest file. Integer columns are nullable int64: a row that leaves one out stays null
    (its model default) instead of turning the column into floats."""
    frame = pd.DataFrame(rows)
    integers = [name for name in frame.columns if name in _integer_fields()]
    frame.astype({name: "Int64" for name in integers}).to_parquet(path, index=False)
    return path


def _integer_fields() -> set[str]:
    def is_integer(annotation: Any) -> bool:
        return annotation is int or int in typing.get_args(annotation)

    return {name for name, field in ManifestRow.model_fields.items() if is_integer(field.annotation)}
