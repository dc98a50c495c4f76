"""The results index on its own (no Ray): records, shards, what counts as finished, and readers during folds."""

from __future__ import annotations

import io
import threading
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skyreels_batch import storage
from skyreels_batch.output.results import (
    RESULTS,
    SHARDS,
    ResultsIndex,
    read_index,
    record_uri,
    results_dir,
    write_record,
)
from tests.conftest import BUCKET, distinct


def done(video_id: str, request: str = "r1", **columns) -> dict:
    return {
        "id": video_id,
        "status": "done",
        "request_hash": request,
        "uri": f"videos/{video_id}.mp4",
        "num_frames": 17,
        "render_started": datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc),
        **columns,
    }


def commit_mp4(output: str, video_id: str) -> None:
    storage.write_bytes_atomic(storage.join(output, "videos", f"{video_id}.mp4"), b"mp4")


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_endpoint")
    return f"s3://{BUCKET}/index-{tmp_path.name}"


def read_plain(output: str) -> pd.DataFrame:
    """What pandas (or any Parquet reader pointed at the folder) sees."""
    return pd.read_parquet(results_dir(output))


def test_records_a_killed_run_left_are_folded_into_the_shards_and_deleted(output: str) -> None:
    for video_id in ("a", "b"):
        commit_mp4(output, video_id)
        write_record(output, done(video_id))  # what the writer stage commits with each MP4
    index = ResultsIndex(output)  # a new run opens the output
    assert not storage.list_files(storage.join(output, "_records"))
    rows = read_plain(output).set_index("id")
    assert sorted(rows.index) == ["a", "b"] and (rows.status == "done").all()
    assert rows.loc["a"].render_started == pd.Timestamp("2026-11-30 12:00", tz="UTC")
    assert sorted(index.finished().to_pydict()["id"]) == ["a", "b"]


def test_finished_needs_the_record_and_the_mp4(output: str) -> None:
    commit_mp4(output, "no-record")  # the writer died between the MP4 and its record: not trusted
    write_record(output, done("no-mp4"))  # the MP4 was deleted since
    commit_mp4(output, "both")
    write_record(output, done("both", request="r7"))
    index = ResultsIndex(output)
    index.add([{"id": "failed", "status": "failed", "error": "row 'failed': boom"}])
    commit_mp4(output, "failed")
    index.flush()
    assert index.finished().to_pylist() == [{"id": "both", "request_hash": "r7"}]


def run(output: str, rows: list[dict]) -> ResultsIndex:
    """What a job does with the index: open it, take out the ids it writes again, add rows as they come back
    (a part per flush), fold its parts into the shards at the end."""
    index = ResultsIndex(output)
    index.retract(pa.array([row["id"] for row in rows], pa.string()))
    for start in range(0, len(rows), 50):
        index.add(rows[start : start + 50])
        index.flush()
    index.close()
    return index


def test_one_row_per_id_in_at_most_shards_files_however_many_runs(output: str) -> None:
    ids = [f"video-{number}" for number in range(200)]
    for attempt, status in enumerate(["failed", "done", "done"]):  # failed, then done, then a new request
        run(output, [{"id": video_id, "status": status, "request_hash": f"r{attempt}"} for video_id in ids])
    rows = read_plain(output)
    assert sorted(rows.id) == sorted(ids) and set(rows.request_hash) == {"r2"}
    files = storage.list_names(results_dir(output))
    assert len(files) <= SHARDS and all(name.startswith("shard-") for name in files)


def test_a_fold_larger_than_fold_rows_goes_group_by_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("skyreels_batch.output.results.FOLD_ROWS", 40)
    output = str(tmp_path / "out")
    run(output, [{"id": f"v{number}", "status": "done", "request_hash": "a"} for number in range(300)])
    run(output, [{"id": f"v{number}", "status": "done", "request_hash": "b"} for number in range(0, 300, 2)])
    rows = read_plain(output).set_index("id")
    assert len(rows) == 300 and rows.index.is_unique
    assert (rows.request_hash == ["b" if int(name[1:]) % 2 == 0 else "a" for name in rows.index]).all()


def test_a_killed_runs_parts_are_folded_in_by_the_next_run(output: str) -> None:
    killed = ResultsIndex(output)
    killed.add([done("a"), {"id": "b", "status": "failed", "error": "row 'b': boom"}])
    killed.flush()  # and then the driver is killed: no close
    write_record(output, done("c"))  # a video it committed after its last flush
    ResultsIndex(output)
    assert all(name.startswith("shard-") for name in storage.list_names(results_dir(output)))
    assert sorted(read_plain(output).id) == ["a", "b", "c"]


def test_index_files_of_the_older_layout_are_folded_in_later_files_winning(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    for name, status in (
        ("results-20261124T010000-aaaa.parquet", "failed"),
        ("results-20261125T010000-bbbb.parquet", "done"),
    ):
        rows = pa.Table.from_pylist([{"id": "x", "status": status}, {"id": f"only-{status}", "status": status}])
        buffer = io.BytesIO()
        pq.write_table(rows, buffer)  # an older file: fewer columns than the index has now
        storage.write_bytes_atomic(storage.join(results_dir(output), name), buffer.getvalue())
    ResultsIndex(output)
    rows = read_plain(output).set_index("id")
    assert rows.loc["x"].status == "done" and sorted(rows.index) == ["only-done", "only-failed", "x"]
    assert all(name.startswith("shard-") for name in storage.list_names(results_dir(output)))
    assert list(read_plain(output).columns) == RESULTS.names


def test_readers_see_a_consistent_index_while_a_run_adds_to_it(output: str) -> None:
    """pandas reads the index over and over while a run flushes (and merges) parts: a read that succeeds holds each
    id once, or one row twice while two parts are merged (a read may also find a merged part gone: it reads again);
    read_index holds each id once and never fewer rows than the read before it; no file is changed once written."""
    run(output, [done(f"earlier-{number}", request="r0") for number in range(30)])  # shards from an earlier run
    index = ResultsIndex(output)
    index.retract(pa.array([f"earlier-{number}" for number in range(10)], pa.string()))  # rendered again
    batches = [[done(f"v{batch}-{row}") for row in range(20)] for batch in range(25)]
    batches[3] += [done(f"earlier-{number}", request="r1") for number in range(10)]
    finished, read_once = threading.Event(), threading.Event()

    def flushes() -> None:
        for batch in batches:
            index.add(batch)
            index.flush()
            # A run flushes every few seconds: the reader reads at least once between two flushes, however slow the
            # machine (its reads still overlap the flushes and merges, as the reader never waits).
            read_once.clear()
            read_once.wait(timeout=60)
        finished.set()

    writer = threading.Thread(target=flushes)
    writer.start()
    counts, seen = [], {}
    fs, root = fsspec.core.url_to_fs(results_dir(output))
    while not finished.is_set():
        fs.invalidate_cache()
        try:
            assert distinct(read_plain(output)).id.is_unique
        except OSError:  # a part merged away between the listing and the read (on S3 pyarrow's own error)
            pass
        rows = read_index(output)
        assert rows.id.is_unique
        counts.append(len(rows))
        # Hidden names are a local write's staging file, which readers skip and which is gone once renamed.
        for name in (name for name in storage.list_names(results_dir(output)) if not name.startswith(".")):
            try:
                data = storage.read_bytes(storage.join(results_dir(output), name))
            except FileNotFoundError:  # merged away since the listing
                continue
            assert seen.setdefault(name, data) == data, f"{name} changed during the run"
        read_once.set()
    writer.join()
    assert len(read_plain(output)) == 30 + 500
    assert counts == sorted(counts) and len(counts) >= len(batches), counts
    index.close()
    rows = read_plain(output).set_index("id")
    assert len(rows) == 530 and rows.index.is_unique and rows.loc["earlier-3"].request_hash == "r1"


def test_read_index_is_exact_during_a_fold_where_a_plain_read_lists_a_row_twice(
    output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(output, [done(f"earlier-{number}", request="r0") for number in range(30)])
    index = ResultsIndex(output)
    index.add([done(f"new-{number}") for number in range(40)])
    index.flush()
    every = {f"earlier-{number}" for number in range(30)} | {f"new-{number}" for number in range(40)}
    # The fold stopped between its two steps: the part's rows are in the shards, the part is not deleted yet.
    with monkeypatch.context() as frozen:
        frozen.setattr("skyreels_batch.output.results.storage.remove_files", lambda uris: None)
        index.close()
    plain = read_plain(output)
    assert len(plain) == 30 + 2 * 40 and distinct(plain).id.is_unique  # the same row twice
    exact = read_index(output)
    assert len(exact) == 70 and set(exact.id) == every
    # And reads that overlap a whole fold: every one lists every id once.
    index = ResultsIndex(output)  # folds the stopped fold's part in; then a run of 500 new rows
    for batch in range(10):
        index.add([done(f"more-{batch}-{row}") for row in range(50)])
        index.flush()
    every |= {f"more-{batch}-{row}" for batch in range(10) for row in range(50)}
    closing = threading.Thread(target=index.close)
    closing.start()
    reads = 0
    while closing.is_alive() or reads == 0:
        rows = read_index(output)
        assert len(rows) == len(every) and set(rows.id) == every
        reads += 1
    closing.join()


def test_record_uri_is_beside_the_videos_not_inside_the_index(tmp_path: Path) -> None:
    output = str(tmp_path)
    assert record_uri(output, "clip.v2") == f"{output}/_records/clip.v2.json"
    assert not record_uri(output, "x").startswith(results_dir(output))


def test_a_run_of_many_flushes_keeps_a_few_parts_and_leaves_the_shards_alone(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    earlier = ResultsIndex(output)
    earlier.add([done(f"old-{number}") for number in range(200)])
    earlier.close()
    shards = {path: path.stat().st_mtime_ns for path in Path(results_dir(output)).glob("shard-*.parquet")}
    index, parts_seen = ResultsIndex(output), []
    for flush in range(300):  # 300 flushes: 75 minutes at the default --index-interval
        index.add([done(f"new-{flush}-{number}") for number in range(3)] + [done("again", seed=flush)])
        index.flush()
        parts = sorted(Path(results_dir(output)).glob("part-*.parquet"))
        parts_seen.append(len(parts))
        if flush % 25 == 0:
            exact = read_index(output)
            assert len(exact) == 200 + 3 * (flush + 1) + 1 and exact.set_index("id").seed["again"] == flush
    assert max(parts_seen) <= 9, parts_seen  # log2(300) + 1
    assert {path: path.stat().st_mtime_ns for path in shards} == shards, "no shard rewritten during the run"
    index.close()
    assert len(read_plain(output)) == 200 + 900 + 1 and not list(Path(results_dir(output)).glob("part-*"))


def test_beyond_max_parts_a_run_folds_its_parts_into_the_shards(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("skyreels_batch.output.results.MAX_PARTS", 1)
    output = str(tmp_path / "out")
    index = ResultsIndex(output)
    index.add([done(f"big-{number}") for number in range(10)])
    index.flush()
    index.add([done("small")])
    index.flush()  # 10 rows are more than twice 1: no merge, two parts, one too many
    assert not list(Path(results_dir(output)).glob("part-*")) and list(Path(results_dir(output)).glob("shard-*"))
    assert sorted(read_index(output).id) == sorted([f"big-{number}" for number in range(10)] + ["small"])
