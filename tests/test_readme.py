"""The README's numbers: every table under a `python bench/...` command is that script's results file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

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


def test_every_number_in_a_bench_table_is_in_the_results_file_its_script_writes() -> None:
    tables = list(bench_tables((REPO / "README.md").read_text()))
    assert {script for script, _ in tables} == {"long_video_memory", "throughput", "scaling", "options", "scale"}
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
