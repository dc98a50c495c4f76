"""The README and docs/: every table under a `python bench/...` command is that script's results file, every
relative link and anchor resolves, every page is linked from the README, the index's column table is RESULTS, and
the README's first command prints the job's lines."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.conftest import REPO
from tests.ray_head import run_with_own_ray

BENCH_COMMAND = re.compile(r"`python bench/(\w+)\.py[^`]*`")


def bench_tables(text: str) -> Iterator[tuple[str, list[list[str]]]]:
    """(script name, the table's cells) for each table whose text just before it names a bench command."""
    script, table = None, []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip("|").split("|")])
            continue
        if table:
            if script:
                yield script, table
            script, table = None, []
        if line.startswith("#"):
            script = None
        script = (BENCH_COMMAND.findall(line) or [script])[-1]


def numbers_in(data: object) -> list[float]:
    if isinstance(data, dict):
        return [number for value in data.values() for number in numbers_in(value)]
    if isinstance(data, list):
        return [number for value in data for number in numbers_in(value)]
    return [float(data)] if isinstance(data, int | float) and not isinstance(data, bool) else []


def recorded(cell: str, numbers: list[float]) -> bool:
    """Whether a table cell is text, or a number that is one of `numbers` rounded as the cell is (`1,135`, `0.70`)."""
    text = cell.replace(",", "").removesuffix("×").strip()
    if not re.fullmatch(r"-?\d+(\.\d+)?", text):
        return True
    decimals = len(text.partition(".")[2])
    return any(round(number, decimals) == float(text) for number in numbers)


PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_number_in_a_bench_table_is_in_the_results_file_its_script_writes() -> None:
    tables = [table for page in PAGES for table in bench_tables(page.read_text())]
    expected = {"long_video_memory", "throughput", "scaling", "options", "scale", "gallery", "soak", "quality"}
    expected |= {"step_cache", "attention_mask", "render_time", "encode_determinism"}
    assert {script for script, _ in tables} == expected
    for script, table in tables:
        results = REPO / "bench" / "results" / f"{script}.json"
        assert f"{script}.json" in (REPO / "bench" / f"{script}.py").read_text(), f"{script}.py does not write it"
        numbers = numbers_in(json.loads(results.read_text()))
        for cell in (cell for row in table for cell in row):
            assert recorded(cell, numbers), f"{cell!r} in the README's {script} table is not in {results.name}"


def test_the_check_finds_a_number_that_no_results_file_has(tmp_path: Path) -> None:
    text = "Intro `python bench/options.py --videos 4`:\n\n| a | b |\n| --- | --- |\n| x | 4.77 |\n\n## Next\n\n| 9 |\n"
    (table,) = [table for script, table in bench_tables(text) if script == "options"]
    numbers = numbers_in(json.loads((REPO / "bench" / "results" / "options.json").read_text()))
    assert recorded("4.76", numbers) and not recorded(table[-1][1], numbers)  # 4.77 is in no results file
    assert len(list(bench_tables(text))) == 1, "a table after a heading has no command"


def test_every_relative_link_and_anchor_resolves_and_every_page_is_linked() -> None:
    linked = set()
    for page in PAGES:
        text = page.read_text()
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: {target} does not exist"
            linked.add(resolved)
            if anchor:
                assert anchor in anchors(resolved.read_text()), f"{page.name}: {target}: no such heading"
    assert set(PAGES[1:]) <= linked, "a docs page the README does not lead to"


def test_the_results_index_table_is_the_index_schema() -> None:
    from skyreels_batch.output.results import RESULTS

    section = (REPO / "docs" / "operations.md").read_text().split("\n## The results index\n", 1)[1]
    table = dict(re.findall(r"^\| `(\w+)` \| ([\w ]+?) \|", section.split("\n## ", 1)[0], re.MULTILINE))
    kinds = {"string": "string", "int64": "int", "double": "float", "timestamp[ms, tz=UTC]": "timestamp"}
    kinds |= {"list<item: int64>": "list of int", "list<item: string>": "list of string"}
    assert table == {field.name: kinds[str(field.type)] for field in RESULTS}
    assert list(table) == RESULTS.names


def test_installs_use_the_constraints_the_suite_passed_with_within_pyprojects_bounds() -> None:
    install = 'pip install torch==2.13.0 -c constraints.txt -e ".[test]"'
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    assert readme.count(install) == 2 and install in ci, "both README lines and CI install the same way"
    pins = dict(
        line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if not line.startswith("#")
    )
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {Requirement(text).name: Requirement(text).specifier for text in dependencies}
    for name in ("ray", "diffusers", "torch"):
        assert pins[name] in bounds[name], f"{name} {pins[name]} outside pyproject's {bounds[name]}"
    for name in ("ray", "diffusers"):  # the libraries whose internals the project reaches: what CI tested
        assert version(name) == pins[name], f"{name} {version(name)} installed, constraints.txt pins {pins[name]}"


def test_actor_retries_still_have_no_named_parameter_in_ray_and_no_other_ray_deprecation_is_silenced() -> None:
    """pipeline.on_actor_pool silences Ray's warning for `max_restarts`/`max_task_retries` because Ray names no
    replacement: once map_batches has them as parameters, this fails, and the pool moves to them."""
    import inspect
    import warnings

    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    from skyreels_batch.job.pipeline import on_actor_pool

    named = inspect.signature(ray.data.Dataset.map_batches).parameters
    assert "max_task_retries" not in named and "max_restarts" not in named, "use map_batches' named parameters now"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_actor_pool(ray.data.range(1), _Identity, {}, pool=ray.data.ActorPoolStrategy(size=1), num_gpus=0, num_cpus=0)
        ray.data.range(1).map_batches(_Identity, compute=ray.data.ActorPoolStrategy(size=1), max_restarts=-1)
    ray_warnings = [str(warning.message) for warning in caught if warning.category is RayDeprecationWarning]
    assert len(ray_warnings) == 1 and "ray_remote_args" in ray_warnings[0], "only the unsilenced call warns"


class _Identity:
    def __call__(self, batch: dict) -> dict:
        return batch


# What the libraries print when the project makes them (issue 26): transformers' float32 warning for a model cast
# with `.to(dtype)`, its progress bar of shard writing, its torchvision fallback notice, Ray's and Ray Data's INFO
# lines, and Ray Data's warning that the progress bars the job turned off are off.
LIBRARY_NOISE = (
    "should be kept in float32",
    "Writing model shards",
    "requires torchvision",
    "\tINFO ",
    "Progress bars disabled",
)


@pytest.mark.slow
def test_the_readmes_first_command_prints_the_jobs_lines_not_library_noise(tmp_path: Path) -> None:
    """The README's first command as a newcomer runs it: a Ray of its own, and no embedded model built yet (a cache
    of its own), so the build's output is seen too."""
    command = re.search(r"&& python (jobs/render\.py examples/manifest\.parquet)\n", (REPO / "README.md").read_text())
    assert command, "the README's first command renders the example manifest"
    output = str(tmp_path / "renders")
    job = run_with_own_ray([*command.group(1).split(), "--output", output], env={"SKYREELS_BATCH_CACHE": str(tmp_path)})
    printed = job.stdout + job.stderr
    assert job.returncode == 0 and "5 done, 0 failed of 5" in job.stdout, printed
    assert f"rendering 5 rows of examples/manifest.parquet with tiny-df -> {output}" in job.stdout
    assert list((tmp_path / "models").iterdir()), "the embedded model was built in this run"
    assert not [noise for noise in LIBRARY_NOISE if noise in printed], printed
