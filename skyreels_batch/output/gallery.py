"""The run gallery: `<output>/index.html`, a static page of the results index with relative links only, so it works
opened from local disk and served from the bucket.

- **Assets** (`gallery_assets/`): the page, `gallery/app.js` and `gallery/style.css`, written beside the index.
- **Data**: one script per results index file, `gallery/data/<file>.js`, holding that file's rows (the columns a
  card shows) as arrays; `gallery/files.js` lists them with a version each, so a browser never mixes a rewritten
  shard with its cached copy. A run's parts never change (a merge writes a new one), so while the run goes each
  refresh writes only the new part's script; after a fold (a run's start and end) every shard's script is written
  again.
- The page loads the scripts with script tags (pages opened from disk may not `fetch`), filters in memory (also by
  a quality signal above or below a value, e.g. frozen above 0.5), sorts (by id, render time or a quality signal),
  and draws a page of cards at a time; each card shows its video's quality signals and the gate's flags.
"""

from __future__ import annotations

import io
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from skyreels_batch import storage
from skyreels_batch.output.quality import COLUMNS as QUALITY_COLUMNS

if TYPE_CHECKING:
    from skyreels_batch.output.results import ResultsIndex

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "gallery_assets"
CARD_COLUMNS = ("id", "status", "prompt", "mode", "seed", "width", "height", "num_frames", "num_segments")
# `quality`: the video's quality columns (QUALITY_COLUMNS, in order) in one array, or null where it has none (a
# failed row, a video of a run before the signals): 8 nulls a row would be 4 MB in 100,000 rows.
CARD_COLUMNS += ("render_s", "error", "video", "poster", "sheet", "quality")
# What the cards need from an index file; `params` gives the mode. Files of older versions may lack a column.
INDEX_COLUMNS = ("id", "status", "prompt", "seed", "width", "height", "num_frames", "num_segments", "render_s")
INDEX_COLUMNS += ("error", "uri", "poster_uri", "sheet_uri", "params", *QUALITY_COLUMNS.names)


def gallery_dir(output: str) -> str:
    return storage.join(output, "gallery")


def data_dir(output: str) -> str:
    return storage.join(gallery_dir(output), "data")


class Gallery:
    """The gallery of one output, kept in step with its results index by `refresh`."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.versions: dict[str, str] = {}  # index file stem -> version of its data script
        self.assets_written = False
        self.rewrites_seen: int | None = None  # the index's `rewrites` at the last refresh

    def follow(self, index: ResultsIndex, *, running: bool = True) -> None:
        """Catch up with `index`: the data of its new files, or every file's once it has rewritten its shards since
        the last call (and at the first). The gallery is a view of the index: failing to write it never stops a
        run, and the next call writes what this one did not."""
        try:
            self.refresh(index.files(), rewrite=index.rewrites != self.rewrites_seen, running=running)
        except Exception as error:  # noqa: BLE001
            logger.warning("the gallery was not refreshed (the next refresh tries again): %s", error)
        else:
            self.rewrites_seen = index.rewrites

    def refresh(self, index_files: list[str], *, rewrite: bool, running: bool) -> None:
        """Write the data of index files that have none yet (every file's when `rewrite`: after a fold), remove the
        data of files the index no longer has, then the list. Data first, list last: a page loaded meanwhile sees
        the old list, whose files are all still there or are skipped."""
        if not self.assets_written:
            self._write_assets()
        files = {uri.rsplit("/", 1)[-1].removesuffix(".parquet"): uri for uri in index_files}
        version = f"{time.time_ns():x}"
        for name, uri in files.items():
            if rewrite or name not in self.versions:
                storage.write_bytes_atomic(self._data_uri(name), data_script(uri))
                self.versions[name] = version
        gone = set(self.versions) - set(files)
        if rewrite:  # after a fold; also the scripts of files an earlier run left (only a fold removes index files)
            gone |= {name.removesuffix(".js") for name in storage.list_names(data_dir(self.output), ".js")} - set(files)
        storage.remove_files([self._data_uri(name) for name in sorted(gone)])
        self.versions = {name: self.versions[name] for name in files}
        listing = {
            "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "running": running,
            "files": sorted(self.versions.items()),
        }
        storage.write_bytes_atomic(storage.join(gallery_dir(self.output), "files.js"), _call("files", listing))

    def _data_uri(self, name: str) -> str:
        return storage.join(data_dir(self.output), f"{name}.js")

    def _write_assets(self) -> None:
        storage.write_bytes_atomic(storage.join(self.output, "index.html"), (ASSETS / "index.html").read_bytes())
        for name in ("app.js", "style.css"):
            storage.write_bytes_atomic(storage.join(gallery_dir(self.output), name), (ASSETS / name).read_bytes())
        self.assets_written = True


def data_script(index_file: str) -> bytes:
    """One results index file's rows as a script: `skyreelsGallery.add(columns, rows, quality columns)`."""
    parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(index_file)))
    present = [name for name in INDEX_COLUMNS if name in parquet.schema_arrow.names]
    rows = [card_row(row) for row in parquet.read(columns=present).to_pylist()]
    cards = [[row[name] for name in CARD_COLUMNS] for row in rows]
    return _call("add", list(CARD_COLUMNS), cards, QUALITY_COLUMNS.names)


def card_row(row: dict[str, Any]) -> dict[str, Any]:
    """An index row -> what its card shows. Links are relative to the output, where index.html is."""
    video_id = row["id"]
    params = json.loads(row["params"]) if row.get("params") else {}
    render_s = row.get("render_s")
    quality = [
        _significant(row.get(field.name)) if pa.types.is_floating(field.type) else row.get(field.name)
        for field in QUALITY_COLUMNS
    ]
    return {
        **{name: row.get(name) for name in CARD_COLUMNS},
        "mode": params.get("mode"),
        "seed": None if row.get("seed") is None else str(row["seed"]),  # up to 2^63: more than a JS number holds
        "render_s": None if render_s is None else round(render_s, 2),
        "video": f"videos/{video_id}.mp4" if row.get("uri") else None,
        "poster": f"posters/{video_id}.jpg" if row.get("poster_uri") else None,
        "sheet": f"sheets/{video_id}.jpg" if row.get("sheet_uri") else None,
        "quality": None if all(value is None for value in quality) else quality,
    }


def _significant(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def _call(method: str, *arguments: Any) -> bytes:
    # ensure_ascii also escapes U+2028/U+2029, which end a line in JavaScript source but not in JSON.
    text = ", ".join(json.dumps(argument, ensure_ascii=True, allow_nan=False) for argument in arguments)
    return f"skyreelsGallery.{method}({text});\n".encode()
