"""What a run shows: posters and contact sheets from the writer, the gallery page (in headless Chromium), the run
report, and the output as a HuggingFace `datasets` folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bench.browser import chromium_installed, start_chromium
from skyreels_batch import storage
from skyreels_batch.config import JobConfig
from skyreels_batch.job.pipeline import run_job
from skyreels_batch.models import card_for
from skyreels_batch.output.gallery import Gallery, data_dir
from skyreels_batch.output.report import main as report_main
from skyreels_batch.output.report import read_report, report
from skyreels_batch.output.results import ResultsIndex, results_dir
from skyreels_batch.output.thumbnails import LABEL_HEIGHT, TILE_WIDTH, Thumbnails, sheet_frames
from skyreels_batch.render.segments import SegmentStore
from skyreels_batch.schema import resolve
from skyreels_batch.stages.write import WriteVideos
from tests.conftest import BUCKET, decode, write_manifest

ROWS = [
    {"id": "lake", "prompt": "a quiet lake at noon", "num_frames": 9, "height": 32, "width": 48, "seed": 3},
    # Three segments: 17 frames, then 12 and 8 more.
    {"id": "pier", "prompt": "a long pier at dawn", "num_frames": 37, "base_num_frames": 17, "overlap_history": 5,
     "height": 32, "width": 32, "seed": 4},
    {"id": "harbour", "prompt": "boats in a <b>harbour</b>", "num_frames": 5, "height": 32, "width": 48, "seed": 5},
    {"id": "bad-frames", "prompt": "ten frames is not 4k+1", "num_frames": 10, "height": 32, "width": 48},
    {"id": "no-image", "prompt": "an image that is not there", "mode": "i2v", "image": "/nonexistent/first.png",
     "num_frames": 5, "height": 32, "width": 48},
]  # fmt: skip
DONE = ("harbour", "lake", "pier")


def colour(number: int) -> tuple[int, int, int]:
    return (number * 37) % 256, (number * 91) % 256, (255 - number * 53) % 256


def solid_frames(first: int, count: int, height: int = 32, width: int = 48) -> np.ndarray:
    """Frames numbered from `first`, each one solid colour that names its number: JPEG keeps a solid colour."""
    return np.stack([np.full((height, width, 3), colour(first + k), np.uint8) for k in range(count)])


def tile_colour(sheet: Image.Image, slot: int, columns: int, tile_height: int) -> np.ndarray:
    left, top = (slot % columns) * TILE_WIDTH, (slot // columns) * (tile_height + LABEL_HEIGHT)
    box = (left + TILE_WIDTH // 4, top + tile_height // 4, left + 3 * TILE_WIDTH // 4, top + 3 * tile_height // 4)
    return np.asarray(sheet.crop(box)).reshape(-1, 3).mean(axis=0)


def test_the_sheet_has_evenly_spaced_frames_and_every_seam() -> None:
    assert sheet_frames(5, []) == [0, 1, 2, 3, 4]
    assert sheet_frames(100, []) == [0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99]
    assert sheet_frames(100, [17, 29, 41]) == [0, 9, 17, 18, 27, 29, 36, 41, 45, 54, 63, 72, 81, 90, 99]


def test_the_writer_makes_the_poster_and_sheet_from_the_segments_frames(tmp_path: Path) -> None:
    """Segments whose frames are solid colours naming their numbers, through the writer stage: the poster is the
    middle frame and each tile of the sheet is the frame its label names, seams included."""
    output = str(tmp_path)
    params = resolve(ROWS[1], card_for("tiny-df"), max_frames=1457)
    store = SegmentStore(output, params.id)
    store.open(params)
    for index, (first, count) in enumerate([(0, 17), (17, 12), (29, 8)]):
        store.save(index, solid_frames(first, count, 32, 32), torch.zeros(1), torch.zeros(1))
    row = {"id": params.id, "params": params.model_dump_json(), "num_segments": 3, "error": None, "stopped": None}
    written = WriteVideos(output=output, crf=18, lossless=False).process(params, row)

    poster = np.asarray(Image.open(written["poster_uri"]))
    assert poster.shape == (32, 32, 3)
    np.testing.assert_allclose(poster.reshape(-1, 3).mean(axis=0), colour(18), atol=3)  # frame 37 // 2
    sheet = Image.open(written["sheet_uri"])
    numbers = sheet_frames(37, [17, 29])
    assert {17, 29} <= set(numbers)
    columns, tile_height = 6, TILE_WIDTH  # square frames: square tiles
    assert sheet.size == (columns * TILE_WIDTH, -(-len(numbers) // columns) * (tile_height + LABEL_HEIGHT))
    for slot, number in enumerate(numbers):
        np.testing.assert_allclose(tile_colour(sheet, slot, columns, tile_height), colour(number), atol=3)


def test_a_v2v_sheet_shows_where_the_clip_ends() -> None:
    thumbnails = Thumbnails(total=40, seams=[21])  # a 21-frame clip, then the first new frame
    list(thumbnails.watch(solid_frames(0, 40)))
    assert 21 in thumbnails.sheet_frames and thumbnails.poster_frame == 20


@pytest.fixture(scope="module")
def finished_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gallery-run")
    manifest = write_manifest(root / "m.parquet", ROWS)
    summary = run_job(JobConfig(manifest=str(manifest), output=str(root / "out")), log=lambda _: None)
    assert (summary.done, summary.failed) == (3, 2)
    return root / "out"


@pytest.mark.slow
def test_every_video_has_its_poster_and_sheet_in_the_index(finished_run: Path) -> None:
    index = pd.read_parquet(results_dir(str(finished_run))).set_index("id")
    for video_id in DONE:
        frames, _ = decode(finished_run / "videos" / f"{video_id}.mp4")
        poster = np.asarray(Image.open(index.loc[video_id].poster_uri))
        assert poster.shape == frames.shape[1:]
        # The middle frame, not another: closer to the MP4's middle frame than to its first or last.
        distance = [np.abs(poster.astype(int) - frames[k].astype(int)).mean() for k in range(len(frames))]
        assert int(np.argmin(distance)) == len(frames) // 2, distance
        assert Image.open(index.loc[video_id].sheet_uri).format == "JPEG"
    assert index.loc[["bad-frames", "no-image"]].poster_uri.isna().all()
    assert index.loc["bad-frames"].prompt == "ten frames is not 4k+1", "a row failed in validation keeps its prompt"


@pytest.mark.slow
def test_every_video_has_its_quality_signals_in_the_index(finished_run: Path) -> None:
    """The embedded model renders noise: never black or frozen, always moving; the chained video has seams."""
    index = pd.read_parquet(results_dir(str(finished_run))).set_index("id")
    done = index.loc[list(DONE)]
    assert (done.quality_black_fraction == 0).all() and (done.quality_frozen_fraction == 0).all()
    assert (done.quality_motion > 0).all() and (done.quality_sharpness > 0).all()
    assert done.quality_seam_jump.notna().tolist() == [False, False, True]  # pier: three segments
    assert done.quality_flags.isna().all(), "no gate by default: signals only"
    assert index.loc[["bad-frames", "no-image"]].quality_motion.isna().all()


@pytest.mark.slow
def test_the_output_loads_as_a_huggingface_videofolder_dataset(finished_run: Path) -> None:
    import datasets

    loaded = datasets.load_dataset("videofolder", data_dir=str(finished_run / "videos"), split="train")
    # Decoding needs torchcodec, which CPU machines here do not have: read the paths, decode with PyAV.
    loaded = loaded.cast_column("video", datasets.Video(decode=False))
    by_id = {row["id"]: row for row in loaded}
    assert sorted(by_id) == sorted(DONE)
    for source in ROWS[:3]:
        row = by_id[source["id"]]
        assert row["caption"] == source["prompt"]
        assert (row["seed"], row["mode"], row["width"], row["height"]) == (source["seed"], "t2v", source["width"], 32)
        assert row["num_inference_steps"] > 0 and row["model"] == "tiny-df"
        assert len(decode(row["video"]["path"])[0]) == source["num_frames"]
    assert sorted(loaded.filter(lambda row: row["quality_frozen_fraction"] < 0.5)["id"]) == sorted(DONE)


@pytest.mark.slow
def test_the_report_reads_the_index(finished_run: Path, tmp_path: Path, capsys) -> None:
    assert report_main([str(finished_run), "--plot", str(tmp_path / "plot.png")]) == 0
    printed = capsys.readouterr().out
    assert "rows 5: 3 done, 2 failed" in printed
    assert "failed, num_frames: 1" in printed and "failed, image: 1" in printed
    assert re.search(r"^\s*tiny-df\s+t2v\s+48x32\s+2\s", printed, re.MULTILINE), printed  # 2 of that model and size
    assert "quality signals of 3 videos" in printed
    assert re.search(r"^\s*seam_jump\s+1\s", printed, re.MULTILINE), "one chained video has a seam jump"
    assert re.search(r"^\s*frozen_fraction\s+highest\s+\S+\s+0\s*$", printed, re.MULTILINE), printed
    assert Image.open(tmp_path / "plot.png").size == (1100, 400)


def test_the_report_arithmetic(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    started = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    rows = [
        {"id": f"v{k}", "status": "done", "render_started": started + timedelta(minutes=10 * k), "render_s": 60.0,
         "transformer_s": 45.0, "decode_s": 6.0, "persist_wait_s": 3.0, "encode_s": 0.0, "model": "m", "width": 48,
         "height": 32, "params": json.dumps({"mode": "t2v"})}
        for k in range(4)
    ] + [
        {"id": "bad", "status": "failed", "error": "row 'bad': num_frames: must be 4k+1 (e.g. 17, 97), got 10"},
        {"id": "gone", "status": "failed", "error": "row 'gone': lost 3 times, the last time while rendering it"},
    ]  # fmt: skip
    index = ResultsIndex(output)
    index.add(rows)
    index.close()
    printed = report(read_report(output))
    assert "rows 6: 4 done, 2 failed" in printed
    assert "failed, num_frames: 1" in printed and "failed, lost (gave up after retries): 1" in printed
    assert "videos per hour: 7.7 (over 31.0 min of wall time)" in printed  # 4 videos from 12:00 to 12:31
    assert "GPU-hours (render actor time): 0.067; the transformer's share: 75%, decoding 10%, " in printed
    assert "waiting for storage 5%, the rest 10%" in printed


def test_the_gallery_follows_the_index_as_a_run_goes(tmp_path: Path) -> None:
    output = str(tmp_path / "out")

    def shown() -> list[str]:
        listing = _script_argument((tmp_path / "out" / "gallery" / "files.js").read_text())
        ids = []
        for name, _ in listing["files"]:
            columns, rows, _ = _script_arguments((tmp_path / "out" / "gallery" / "data" / f"{name}.js").read_text())
            ids += [row[columns.index("id")] for row in rows]
        return sorted(ids)

    # The driver has the gallery follow the index (run_job, the collector's flushes): a new part's data, every
    # file's once the shards were rewritten.
    first, gallery = ResultsIndex(output), Gallery(output)
    first.add([{"id": "a", "status": "done"}, {"id": "b", "status": "failed", "error": "row 'b': x: bad"}])
    first.close()
    gallery.follow(first, running=False)
    assert shown() == ["a", "b"]
    assert (tmp_path / "out" / "index.html").exists() and (tmp_path / "out" / "gallery" / "app.js").exists()

    second, gallery = ResultsIndex(output), Gallery(output)  # b is rendered again: out of the shards, into a part
    second.retract(pa_array(["b"]))
    gallery.follow(second)
    assert shown() == ["a"]
    second.add([{"id": "b", "status": "done"}, {"id": "c", "status": "done"}])
    second.flush()
    written = {path.name: path.stat().st_mtime_ns for path in Path(data_dir(output)).iterdir()}
    gallery.follow(second)
    assert shown() == ["a", "b", "c"]
    assert _script_argument((tmp_path / "out" / "gallery" / "files.js").read_text())["running"] is True
    rewritten = {
        path.name for path in Path(data_dir(output)).iterdir() if path.stat().st_mtime_ns != written.get(path.name)
    }
    assert all(name.startswith("part-") for name in rewritten), "a flush without a fold writes the new part's data only"
    second.close()
    gallery.follow(second, running=False)
    assert shown() == ["a", "b", "c"]
    assert not [name for name in os.listdir(data_dir(output)) if name.startswith("part-")]
    assert _script_argument((tmp_path / "out" / "gallery" / "files.js").read_text())["running"] is False


def test_a_gallery_that_cannot_be_written_never_stops_the_index(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "gallery").write_text("a file where the gallery's folder goes")
    index, gallery = ResultsIndex(str(output)), Gallery(str(output))
    index.add([{"id": "a", "status": "done"}])
    assert index.flush() == 1
    gallery.follow(index)  # fails, and says so in the log
    index.close()
    gallery.follow(index, running=False)
    assert pd.read_parquet(results_dir(str(output))).id.tolist() == ["a"]
    (output / "gallery").unlink()  # the next refresh writes what the failed ones did not
    gallery.follow(ResultsIndex(str(output)))
    assert (output / "gallery" / "files.js").exists() and list((output / "gallery" / "data").glob("shard-*.js"))


def test_a_gallery_in_a_bucket_is_served_as_a_page(s3_endpoint: str) -> None:
    output = f"s3://{BUCKET}/gallery-served"
    index = ResultsIndex(output)
    index.add([{"id": "a", "status": "done"}])
    index.close()
    Gallery(output).follow(index, running=False)
    s3 = boto3.client("s3")
    types = {key: s3.head_object(Bucket=BUCKET, Key=f"gallery-served/{key}")["ContentType"] for key in (
        "index.html", "gallery/app.js", "gallery/style.css", "gallery/files.js")}  # fmt: skip
    assert types["index.html"] == "text/html" and types["gallery/style.css"] == "text/css"
    assert types["gallery/app.js"].endswith("javascript") and types["gallery/files.js"].endswith("javascript")
    for name, expected in (("posters/a.jpg", "image/jpeg"), ("videos/a.mp4", "video/mp4")):  # the writer's files
        storage.write_bytes_atomic(f"{output}/{name}", b"bytes")
        assert s3.head_object(Bucket=BUCKET, Key=f"gallery-served/{name}")["ContentType"] == expected
    assert "skyreelsGallery.add" in storage.read_bytes(f"{output}/gallery/data/shard-{_shard('a')}.js").decode()


@pytest.fixture(scope="module")
def browser():
    if not chromium_installed():
        if os.environ.get("CI"):
            pytest.fail(".ci/run installs Debian's chromium and chromium-driver; they are missing")
        pytest.skip("Debian's chromium and chromium-driver are not installed here (.ci/run installs them)")
    driver = start_chromium()
    yield driver
    driver.quit()


def open_gallery(browser, output: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get((output / "index.html").as_uri())
    WebDriverWait(browser, 60).until(lambda b: b.execute_script("return document.querySelector('#page').textContent"))


def cards(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('.card')].map(c => c.dataset.id)")


@pytest.mark.slow
def test_the_gallery_in_a_browser(finished_run: Path, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    copy = tmp_path / "opened-from-disk"  # the page needs only what is beside it
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("results", "_*"))
    open_gallery(browser, copy)
    assert sorted(cards(browser)) == sorted(row["id"] for row in ROWS)
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script("return [...document.images].every(i => i.complete)"))  # fmt: skip
    widths = browser.execute_script("return [...document.images].map(i => [i.alt, i.naturalWidth])")
    assert len(widths) == 3 and all(width > 0 for _, width in widths), widths
    error = browser.find_element(By.CSS_SELECTOR, ".card[data-id='bad-frames'] .error").text
    assert "num_frames: must be 4k+1" in error

    prompt = browser.find_element(By.CSS_SELECTOR, ".card[data-id='harbour'] .prompt")
    assert prompt.text == "boats in a <b>harbour</b>", "markup in a prompt is shown as text"
    assert not browser.find_elements(By.CSS_SELECTOR, ".card b")
    browser.find_element(By.ID, "search").send_keys("HARBOUR")
    assert cards(browser) == ["harbour"]
    browser.find_element(By.ID, "search").clear()
    browser.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")
    Select(browser.find_element(By.ID, "status")).select_by_value("failed")
    assert sorted(cards(browser)) == ["bad-frames", "no-image"]
    Select(browser.find_element(By.ID, "status")).select_by_value("")
    quality = browser.find_element(By.CSS_SELECTOR, ".card[data-id='pier'] .quality").text
    assert "frozen 0.00" in quality and "seam jump" in quality, quality
    Select(browser.find_element(By.ID, "signal")).select_by_value("quality_frozen_fraction")
    browser.find_element(By.ID, "threshold").send_keys("0.5")  # frozen above 0.5: noise never is
    assert cards(browser) == []
    Select(browser.find_element(By.ID, "side")).select_by_value("below")
    assert sorted(cards(browser)) == sorted(DONE)
    Select(browser.find_element(By.ID, "sort")).select_by_value("quality_motion")  # the least motion first
    motion = pd.read_parquet(results_dir(str(finished_run))).set_index("id").quality_motion
    assert cards(browser) == motion.loc[list(DONE)].sort_values().index.tolist()
    Select(browser.find_element(By.ID, "signal")).select_by_value("")
    Select(browser.find_element(By.ID, "sort")).select_by_value("id")

    browser.find_element(By.CSS_SELECTOR, ".card[data-id='pier'] .media").click()
    played = WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "const v = document.querySelector(\".card[data-id='pier'] video\");"
            "return v && (v.error ? 'error ' + v.error.code : v.readyState >= 2 ? 'decoded' : null)"
        )
    )
    # Debian's chromium decodes H.264 (it is built against the system's FFmpeg).
    assert played == "decoded"
    assert browser.execute_script("return document.querySelector(\".card[data-id='pier'] video\").videoWidth") == 32


@pytest.mark.slow
def test_the_gallery_pages_through_100_000_rows(browser, tmp_path: Path) -> None:
    output = str(tmp_path / "big")
    index = ResultsIndex(output)
    index.add(
        {"id": f"video-{k:06d}", "status": "failed" if k % 10 == 0 else "done", "prompt": f"prompt number {k}",
         "params": json.dumps({"mode": "t2v"}), "error": "row: x: bad" if k % 10 == 0 else None}
        for k in range(100_000)
    )  # fmt: skip
    index.close()
    Gallery(output).follow(index, running=False)
    open_gallery(browser, tmp_path / "big")
    assert browser.find_element("id", "page").text == "page 1 of 2084 (100,000 rows)"
    assert len(cards(browser)) == 48
    browser.find_element("id", "next").click()
    assert cards(browser)[0] == "video-000048"
    browser.find_element("id", "search").send_keys("number 99999")
    assert cards(browser) == ["video-099999"]
    data = sum(path.stat().st_size for path in Path(data_dir(output)).iterdir())
    assert data < 15e6, "the rows as data, not a 100 MB page"


def pa_array(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _shard(video_id: str) -> str:
    from skyreels_batch.output.results import shard_of

    return f"{shard_of(video_id):02d}"


def _script_arguments(text: str) -> list:
    return json.loads("[" + text[text.index("(") + 1 : text.rindex(")")] + "]")


def _script_argument(text: str):
    return _script_arguments(text)[0]
