"""Pipeline stages. Each is one class: `__init__` does the expensive set-up once, `__call__(batch) -> batch` one job.

Batches are pyarrow Tables. Every stage passes all rows on: a row that failed earlier carries its `error` and
later stages leave it alone, so one bad row never stops the job. A row the job stopped before finishing (a clean
stop) carries `stopped` and is left alone the same way; the next run renders it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import pyarrow as pa
import torch

from skyreels_batch.output import quality
from skyreels_batch.render.inputs import InputError
from skyreels_batch.schema import RenderParams

Loaded = TypeVar("Loaded")

# The columns between stages: small metadata only. Frames and latents travel through storage (`_segments/`),
# not Ray's object store.
VALIDATED = pa.schema(
    [
        ("id", pa.string()),
        ("params", pa.string()),
        ("error", pa.string()),
        ("request_hash", pa.string()),
        ("num_segments", pa.int64()),
        ("cost", pa.int64()),
        ("stopped", pa.bool_()),
    ]
)
RENDERED = pa.schema(
    [
        *VALIDATED,
        pa.field("resumed_segments", pa.int64()),
        pa.field("render_started", pa.timestamp("ms", tz="UTC")),
        pa.field("render_s", pa.float64()),
        pa.field("transformer_s", pa.float64()),
        pa.field("decode_s", pa.float64()),
        pa.field("persist_wait_s", pa.float64()),
    ]
)
WRITTEN = pa.schema(
    [
        *RENDERED,
        pa.field("uri", pa.string()),
        pa.field("poster_uri", pa.string()),
        pa.field("sheet_uri", pa.string()),
        pa.field("latents_uri", pa.string()),
        pa.field("checksum", pa.string()),
        pa.field("encode_s", pa.float64()),
        *quality.COLUMNS,
    ]
)


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class RowStage:
    """A stage that works row by row on validated rows. Rows that already failed pass through untouched; an
    exception while processing a row becomes that row's error, and the other rows carry on."""

    output_schema: ClassVar[pa.Schema]
    failure: ClassVar[str]  # what failed, for the error message: "render failed"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table([self._process_row(row) for row in batch.to_pylist()], self.output_schema)

    def _process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["error"] or row["stopped"]:
            return row
        params = RenderParams.model_validate_json(row["params"])
        try:
            return {**row, **self.process(params, row)}
        except InputError as error:  # the row's own input is bad: say which column, not a stack of types
            return {**row, "error": f"row {params.id!r}: {error}"}
        except Exception as error:  # noqa: BLE001 - a failed row is data; the job goes on
            return {**row, "error": f"row {params.id!r}: {self.failure}: {describe_error(error)}"}

    def process(self, params: RenderParams, row: dict[str, Any]) -> dict[str, Any]:
        """The new columns for one row."""
        raise NotImplementedError


class TorchRowStage(RowStage):
    """A RowStage that runs all its torch work on one thread of its own, with `torch_threads` threads.

    Ray Data calls a stage from a thread pool, not from the thread that built it, and OpenMP keeps a team of
    threads per calling thread: loading on one thread and rendering on another left three busy threads on two
    cores (bench-df: 5.3 s a video instead of 4.2 s).
    """

    def start_torch(self, load: Callable[[], Loaded], torch_threads: int) -> Loaded:
        """Start the torch thread and run `load` (the model) on it; returns what `load` returns."""
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")

        def set_up() -> Loaded:
            torch.set_num_threads(torch_threads)
            return load()

        return self.torch_thread.submit(set_up).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.torch_thread.submit(super().__call__, batch).result()
