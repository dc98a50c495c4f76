"""The finished output as a dataset: `<output>/videos/metadata.parquet` beside the MP4s is HuggingFace `datasets`'
folder layout, so `load_dataset("videofolder", data_dir="<output>/videos")` reads the videos with their captions
and parameters, no glue.

One row per video done: `file_name` (`<id>.mp4`, relative to the folder), `caption` (the prompt), then every
resolved parameter of the render (`id`, `mode`, `seed`, `num_frames`, ...; for v2v `num_frames` counts the frames
added after the clip, and the manifest's `video`, the clip, is `clip`: `video` is the loader's own column), then
the video's quality signals (`quality_<signal>`, `quality_flags`: quality.py), so `datasets` filters on them as
they are. Videos the quality gate flagged are left out unless the job keeps them (`--keep-flagged`).
Written when a run ends, from the whole index (every run's videos, not only this one's), one index file at a time.
"""

from __future__ import annotations

import io
import json
import typing

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skyreels_batch import storage
from skyreels_batch.output import quality
from skyreels_batch.output.results import conform
from skyreels_batch.schema import RenderParams


def metadata_uri(output: str) -> str:
    return storage.join(output, "videos", "metadata.parquet")


def metadata_schema() -> pa.Schema:
    """`file_name`, `caption`, RenderParams' fields in order (`video` as `clip`), then the quality columns."""
    fields = [pa.field("file_name", pa.string()), pa.field("caption", pa.string())]
    for name, field in RenderParams.model_fields.items():
        fields.append(pa.field("clip" if name == "video" else name, _arrow_type(field.annotation)))
    return pa.schema([*fields, *quality.COLUMNS])


def _arrow_type(annotation: object) -> pa.DataType:
    if typing.get_origin(annotation) is typing.Literal:
        return _arrow_type(type(typing.get_args(annotation)[0]))
    if annotation == tuple[str, ...]:
        return pa.list_(pa.string())
    optional = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if optional:  # X | None
        (inner,) = optional
        return _arrow_type(inner)
    return {str: pa.string(), int: pa.int64(), float: pa.float64()}[annotation]


def write_dataset_metadata(output: str, index_files: list[str], keep_flagged: bool = False) -> int:
    """Write the metadata of every video done in `index_files` (and not flagged by the quality gate, unless
    `keep_flagged`), one index file at a time (a million rows' resolved parameters would not fit in the driver at
    once); returns how many rows it has."""
    schema, buffer, count = metadata_schema(), io.BytesIO(), 0
    with pq.ParquetWriter(buffer, schema, compression="zstd") as writer:
        for uri in index_files:
            table = conform(pq.read_table(io.BytesIO(storage.read_bytes(uri))))
            done = table.filter(pc.equal(table["status"], "done"))
            if not keep_flagged:
                flagged = pc.fill_null(pc.greater(pc.list_value_length(done["quality_flags"]), 0), False)
                done = done.filter(pc.invert(flagged))
            rows = []
            for row in done.select(["params", *quality.COLUMNS.names]).to_pylist():
                params = json.loads(row.pop("params"))
                params["clip"] = params.pop("video")
                rows.append({"file_name": f"{params['id']}.mp4", "caption": params["prompt"], **params, **row})
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            count += len(rows)
    if count:
        storage.write_bytes_atomic(metadata_uri(output), buffer.getvalue())
    else:
        storage.remove_files([metadata_uri(output)])
    return count
