"""The results index: `<output>/results/`, a Parquet dataset with one row per manifest row."""

from __future__ import annotations

import io
import json
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from skyreels_batch import storage

RESULTS = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("uri", pa.string()),
        ("error", pa.string()),
        ("prompt", pa.string()),
        ("num_frames", pa.int64()),
        ("fps", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("params", pa.string()),
        ("request_hash", pa.string()),
        ("checksum", pa.string()),
        ("latents_uri", pa.string()),
        ("num_segments", pa.int64()),
        ("resumed_segments", pa.int64()),
        ("render_started", pa.timestamp("ms", tz="UTC")),
        ("render_s", pa.float64()),
        ("transformer_s", pa.float64()),
        ("encode_s", pa.float64()),
    ]
)
PARAM_COLUMNS = ("prompt", "num_frames", "fps", "width", "height", "seed", "model")


def results_dir(output: str) -> str:
    return storage.join(output, "results")


def result_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row that left the writer stage -> its results index row: the index's columns the row carries, the
    resolved parameters broken out, and the status."""
    params = json.loads(row["params"]) if row.get("params") else {}
    carried = [name for name in RESULTS.names if name not in PARAM_COLUMNS and name != "status"]
    return {
        **{name: row.get(name) for name in carried},
        **{name: params.get(name) for name in PARAM_COLUMNS},
        "status": "failed" if row.get("error") else "done",
    }


def write_index(output: str, rows: list[dict[str, Any]]) -> str:
    """Write this run's rows as one Parquet file, keeping earlier runs' rows for ids this run did not touch,
    then remove the earlier files. Returns the new file's URI."""
    directory = results_dir(output)
    earlier = storage.list_files(directory, ".parquet")
    touched = {row["id"] for row in rows}
    kept = [row for row in read_index_files(earlier) if row["id"] not in touched]
    name = f"results-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(kept + rows, schema=RESULTS), buffer)
    uri = storage.join(directory, name)
    storage.write_bytes_atomic(uri, buffer.getvalue())
    for old in earlier:
        storage.remove_tree(old)
    return uri


def finished_requests(output: str) -> dict[str, str]:
    """id -> request hash of the videos an earlier run finished: `done` in the index and its MP4 committed.
    Cheap: the index files and one listing of `videos/`; no video is read."""
    done = {
        row["id"]: row["request_hash"]
        for row in read_index_files(storage.list_files(results_dir(output), ".parquet"))
        if row["status"] == "done" and row.get("request_hash")
    }
    committed = {
        uri.rsplit("/", 1)[-1].removesuffix(".mp4")
        for uri in storage.list_files(storage.join(output, "videos"), ".mp4")
    }
    return {video_id: request for video_id, request in done.items() if video_id in committed}


def read_index_files(uris: list[str]) -> list[dict[str, Any]]:
    """Rows of index files, later files winning for the same id (file names sort by time)."""
    latest: dict[str, dict[str, Any]] = {}
    for uri in sorted(uris):
        for row in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist():
            latest[row["id"]] = row
    return list(latest.values())
