"""The results index, `<output>/results/`: one row per manifest row, readable while a job runs.

- **Records.** The writer stage proves each video it commits: right after the MP4 it writes the video's index row
  as `<output>/_records/<id>.json`. An MP4 without a record is not trusted (the writer may have died between the
  two), and a record is only believed while its MP4 is there.
- **During a run** the driver writes, every few seconds, the rows that came back since the last time (done,
  failed) as a new file, `results/part-<run>-<n>.parquet`, then deletes their records. Parts are merged as they
  come, the newest into the one before while that one is at most twice its size (a binary counter): a run of days
  keeps a handful of parts (at most log2 of its flushes, never more than MAX_PARTS: beyond, they are folded into the
  shards), each row is rewritten a few times in all, and the shards are not touched until the run ends. A file is
  written whole and never changed, so a reader (pandas, Ray Data, on S3 too: they take a file's size from the
  listing, so a file replaced under them is a torn read) reads whole files; while two parts are merged it may see
  the same row twice, which `read_index` keeps once. No id is listed twice otherwise: rows of ids the run writes
  again were taken out of the shards when it started.
- **Between runs the index is SHARDS Parquet files**, `results/shard-NN.parquet`; an id always lives in the shard
  its hash names. A run folds its parts into the shards when it ends (or stops), and a run that starts folds in
  what a killed one left (its parts and records). During those folds and merges, seconds long, a reader can see a
  row twice (the same row: copied into its new file, the old one not deleted yet) or find a file replaced under it;
  `read_index` reads the index exactly at any moment. Beside them, `results/_runs/<run>.json` holds each run's metadata.
- **The gallery** (gallery.py) follows the index: the driver has it catch up after each flush, and every file's
  data is written again once the index has rewritten its shards (`rewrites`: a fold or a retraction).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skyreels_batch import storage
from skyreels_batch.output import quality

RESULTS = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("uri", pa.string()),
        ("poster_uri", pa.string()),
        ("sheet_uri", pa.string()),
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
        ("decode_s", pa.float64()),
        ("persist_wait_s", pa.float64()),
        ("encode_s", pa.float64()),
        *quality.COLUMNS,
    ]
)
PARAM_COLUMNS = ("prompt", "num_frames", "fps", "width", "height", "seed", "model")
# Enough that a fold rewrites a small part of a million-row index, few enough to read in one go.
SHARDS = 64
# Rows a fold holds at once (about 1 KB each, most of it `params`): a fold of more goes shard group by shard group.
FOLD_ROWS = 200_000
# Parts a run keeps at most (the binary counter keeps about log2 of its flushes: 15 after 32,000 flushes).
MAX_PARTS = 16


def results_dir(output: str) -> str:
    return storage.join(output, "results")


def runs_dir(output: str) -> str:
    """One JSON file per run (its model loads); Parquet readers skip folders whose name starts with `_`."""
    return storage.join(results_dir(output), "_runs")


def records_dir(output: str) -> str:
    return storage.join(output, "_records")


def record_uri(output: str, video_id: str) -> str:
    return storage.join(records_dir(output), f"{video_id}.json")


def shard_name(shard: int) -> str:
    return f"shard-{shard:02d}.parquet"


def shard_of(video_id: str) -> int:
    return int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:4], "big") % SHARDS


def new_run_id() -> str:
    """`20261205T234800-1a2b3c4d`: sorts by start time."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


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


def write_record(output: str, result: dict[str, Any]) -> None:
    """The proof that a video was committed, and for which request: its index row, next to nothing else."""
    text = json.dumps(result, default=lambda value: value.isoformat(), sort_keys=True)
    storage.write_bytes_atomic(record_uri(output, result["id"]), text.encode())


def committed(output: str, video_id: str, request_hash: str | None) -> dict[str, Any] | None:
    """The row's record, when its video is committed for this same request and its MP4 is there; else None. A
    writer task Ray retries after it committed, and a row lost on its way back to the driver and admitted again,
    find it here: a commit is final. (Once the driver has the row back it flushes the record away, and never hands
    that row out again.)"""
    if request_hash is None:
        return None
    try:
        record = read_record(record_uri(output, video_id))
    except FileNotFoundError:
        return None
    if record.get("request_hash") != request_hash or not record.get("uri"):
        return None
    fs, path = storage.filesystem(record["uri"])
    return record if fs.exists(path) else None


def columns_of(record: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """What a committed row's record says of a stage's output columns (its own `id`, no `error`)."""
    return {name: record[name] for name in schema.names if name in record and name not in ("id", "error")}


def read_record(uri: str) -> dict[str, Any]:
    row = json.loads(storage.read_bytes(uri))
    if row.get("render_started"):
        row["render_started"] = datetime.fromisoformat(row["render_started"])
    return row


class ResultsIndex:
    """The index of one output, for one run. Opening it folds in what earlier runs left outside the shards; `add`
    queues rows (thread-safe), `flush` writes them as a part, `close` folds the run's parts into the shards."""

    def __init__(self, output: str, run: str | None = None) -> None:
        self.output = output
        self.run = run or new_run_id()
        self.parts: list[tuple[str, int]] = []  # this run's parts, oldest first, and their rows
        self.flushes = self.merges = 0
        self.rewrites = 0  # times the shards were rewritten (folds, retractions): what a view must read again
        self._pending: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._fold_records(self._unfolded_files())

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            for row in rows:
                self._pending[row["id"]] = row

    def flush(self) -> int:
        """Write the queued rows as a new part and delete their records; returns how many rows were written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        self.flushes += 1
        self.parts.append((self._part_uri(), len(pending)))
        _write_table(self.parts[-1][0], pa.Table.from_pylist(list(pending.values()), schema=RESULTS))
        storage.remove_files([record_uri(self.output, video_id) for video_id in pending])
        self._merge_parts()
        return len(pending)

    def _part_uri(self, merged: bool = False) -> str:
        # A merged part is named after its newest member, then `m<merge>` (after it in name order, before the next
        # flush's): names keep sorting in the order the rows were written, and no file is ever written twice.
        merge = f"m{self.merges:06d}" if merged else ""
        return storage.join(results_dir(self.output), f"part-{self.run}-{self.flushes:06d}{merge}.parquet")

    def _merge_parts(self) -> None:
        """Merge the newest part into the one before while that one is at most twice its size; beyond MAX_PARTS,
        fold them all into the shards."""
        while len(self.parts) >= 2 and self.parts[-2][1] <= 2 * self.parts[-1][1]:
            (older, _), (newer, _) = self.parts[-2:]
            latest = {}
            for table in (_read_table(older), _read_table(newer)):  # the newer's rows win
                latest.update((row["id"], row) for row in table.to_pylist())
            self.merges += 1
            uri = self._part_uri(merged=True)
            _write_table(uri, pa.Table.from_pylist(list(latest.values()), schema=RESULTS))
            storage.remove_files([older, newer])
            self.parts[-2:] = [(uri, len(latest))]
        if len(self.parts) > MAX_PARTS:
            self._fold([uri for uri, _ in self.parts], [])
            self.parts = []

    def retract(self, video_ids: pa.Array) -> None:
        """Take these ids' rows out of the shards: the run writes them again (a row that failed, a changed request,
        an MP4 gone missing), and the index must not list an id twice meanwhile."""
        for name in self._shard_names():
            uri = storage.join(results_dir(self.output), name)
            if pc.any(pc.is_in(_read_table(uri, ["id"])["id"], video_ids)).as_py():
                table = _read_table(uri)
                _write_table(uri, table.filter(pc.invert(pc.is_in(table["id"], video_ids))))
                self.rewrites += 1

    def record_run(self, metadata: dict[str, Any]) -> None:
        uri = storage.join(runs_dir(self.output), f"{self.run}.json")
        storage.write_bytes_atomic(uri, json.dumps(metadata, indent=1).encode())

    def close(self) -> int:
        """Fold this run's parts into the shards, and the records of videos its writers committed that the driver
        has not seen (a stopped run's last ones); returns how many such records there were."""
        self.flush()
        folded = self._fold_records([uri for uri, _ in self.parts])
        self.parts = []
        return folded

    def files(self) -> list[str]:
        """The index's files now: its shards and the parts of runs not folded yet."""
        return storage.list_files(results_dir(self.output), ".parquet")

    def _fold_records(self, files: list[str]) -> int:
        records = storage.list_files(records_dir(self.output), ".json")
        self._fold(files, [read_record(uri) for uri in records])
        storage.remove_files(records)
        return len(records)

    def finished(self) -> pa.Table:
        """`id`, `request_hash` of every video done for the request it was made for and still committed: done in
        the shards (opening the index folded in every record) and its MP4 in `videos/`."""
        uris = [storage.join(results_dir(self.output), name) for name in self._shard_names()]
        columns = ["id", "status", "request_hash"]
        tables = [_read_table(uri, columns) for uri in uris]
        index = pa.concat_tables(tables) if tables else RESULTS.empty_table().select(columns)
        done = index.filter(pc.equal(index["status"], "done")).select(["id", "request_hash"])
        videos = storage.list_names(storage.join(self.output, "videos"), ".mp4")
        committed = [name.removesuffix(".mp4") for name in videos if not name.startswith(".")]
        return done.filter(pc.is_in(done["id"], pa.array(committed, pa.string())))

    def _unfolded_files(self) -> list[str]:
        """Parts of runs that were killed, and index files of the layout before shards (one file per run)."""
        files = storage.list_files(results_dir(self.output), ".parquet")
        return [uri for uri in files if uri.rsplit("/", 1)[-1] not in _SHARDS]

    def _shard_names(self) -> list[str]:
        return [name for name in storage.list_names(results_dir(self.output)) if name in _SHARDS]

    def _fold(self, files: list[str], rows: list[dict[str, Any]]) -> None:
        """Merge the rows of `files` (in name order, later rows winning: part and older index names sort by time),
        then `rows`, into the shards, a group of shards at a time; then delete the files."""
        groups = max(1, math.ceil((sum(_num_rows(uri) for uri in files) + len(rows)) / FOLD_ROWS))
        for group in range(groups):
            latest: dict[str, dict[str, Any]] = {}
            # Rows, not a cast: an older index file may lack a column added since (null for its rows).
            for table in [*(_read_table(uri) for uri in sorted(files)), pa.Table.from_pylist(rows, schema=RESULTS)]:
                for row in table.to_pylist():
                    if shard_of(row["id"]) % groups == group:
                        latest[row["id"]] = row
            by_shard: dict[int, list[dict[str, Any]]] = {}
            for row in latest.values():
                by_shard.setdefault(shard_of(row["id"]), []).append(row)
            for shard, shard_rows in sorted(by_shard.items()):
                self._merge_into_shard(shard, pa.Table.from_pylist(shard_rows, schema=RESULTS))
        storage.remove_files(files)
        self.rewrites += 1

    def _merge_into_shard(self, shard: int, rows: pa.Table) -> None:
        uri = storage.join(results_dir(self.output), shard_name(shard))
        try:
            kept = conform(_read_table(uri))
            kept = kept.filter(pc.invert(pc.is_in(kept["id"], rows["id"])))
        except FileNotFoundError:
            kept = RESULTS.empty_table()
        _write_table(uri, pa.concat_tables([kept, rows]))


_SHARDS = frozenset(shard_name(shard) for shard in range(SHARDS))


def read_index(output: str, attempts: int = 10) -> pd.DataFrame:
    """The index, one row per id, exact whenever it is read: during a fold, a row copied into its shard whose part
    is not deleted yet is kept once, and a part folded away between listing and reading sends the read back to the
    listing. Outside folds and merges a plain read (pandas, Ray Data) is exact too."""
    for _ in range(attempts):
        files = storage.list_files(results_dir(output), ".parquet")
        files.sort(key=lambda uri: uri.rsplit("/", 1)[-1] not in _SHARDS)  # shards, then parts oldest first
        try:
            tables = [_read_table(uri) for uri in files]
        except FileNotFoundError:
            continue
        if not tables:
            raise FileNotFoundError(f"no results index under {output}")
        # A later row wins: a part's over a shard's, a later part's over an earlier one's (older layouts lack
        # columns added since: null for their rows).
        frame = pa.concat_tables(tables, promote_options="default").to_pandas()
        return frame.drop_duplicates("id", keep="last").reset_index(drop=True)
    raise RuntimeError(f"the results index under {output} changed under {attempts} reads in a row")


def conform(table: pa.Table) -> pa.Table:
    """An index file in RESULTS' schema: a file written before a column was added has it null."""
    missing = [field for field in RESULTS if field.name not in table.column_names]
    for field in missing:
        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(RESULTS.names).cast(RESULTS)


def _read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def _num_rows(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as file:  # the footer only
        return pq.ParquetFile(file).metadata.num_rows


def _write_table(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table.sort_by("id"), buffer, compression="zstd")
    storage.write_bytes_atomic(uri, buffer.getvalue())
