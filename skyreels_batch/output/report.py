"""A run report from the results index alone: `python -m skyreels_batch.output.report OUTPUT [--plot FILE.png]`.

Totals (done, failed by kind of error), videos per hour, GPU-hours (render actor time), the transformer's share of
it, seconds per video by model, mode and size, the slowest rows, and the quality signals (quality.py): their
distributions, the videos the gate flagged, and the worst video by each signal. `--plot` draws throughput over time
and the distribution of seconds per video (matplotlib: `pip install -e ".[report]"`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import pandas as pd

from skyreels_batch import storage
from skyreels_batch.output.quality import GATE
from skyreels_batch.output.results import read_index

SLOWEST = 5
# `row 'x': <what>: ...`: the error's kind is <what> (a field, or the stage that failed: "render failed").
ERROR_KIND = re.compile(r"^row .*?: ([a-z0-9_ /]+?)(?:: |$)")
LOST = re.compile(r"^row .*?: lost \d+ times")


def read_report(output: str) -> pd.DataFrame:
    """The index (one row per id, read exactly even while a job folds it) with the columns the report groups by."""
    try:
        frame = read_index(storage.normalize(output))
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    params = frame["params"].map(lambda text: json.loads(text) if isinstance(text, str) else {})
    frame["mode"] = params.map(lambda p: p.get("mode"))
    sizes = zip(frame["width"], frame["height"], strict=True)
    frame["size"] = [f"{int(w)}x{int(h)}" if pd.notna(w) and pd.notna(h) else None for w, h in sizes]
    frame["error_kind"] = frame["error"].map(error_kind)
    return frame


def error_kind(error: object) -> str | None:
    if not isinstance(error, str):
        return None
    if LOST.match(error):
        return "lost (gave up after retries)"
    match = ERROR_KIND.match(error)
    return match.group(1) if match else "other"


def report(frame: pd.DataFrame) -> str:
    done = frame[frame.status == "done"]
    lines = [f"rows {len(frame):,}: {len(done):,} done, {len(frame) - len(done):,} failed"]
    for kind, count in frame.error_kind.value_counts().items():
        lines.append(f"  failed, {kind}: {count:,}")
    timed = done.dropna(subset=["render_started", "render_s"])
    if len(timed):
        ended = timed.render_started + pd.to_timedelta(timed.render_s + timed.encode_s.fillna(0), unit="s")
        hours = max((ended.max() - timed.render_started.min()).total_seconds() / 3600, 1e-9)
        render_hours = timed.render_s.sum() / 3600
        busy = timed.render_s.sum() or 1.0
        share = timed.transformer_s.sum() / busy
        decode, waited = timed.decode_s.fillna(0).sum() / busy, timed.persist_wait_s.fillna(0).sum() / busy
        lines += [
            f"videos per hour: {len(timed) / hours:,.1f} (over {_duration(hours * 3600)} of wall time)",
            f"GPU-hours (render actor time): {render_hours:,.3f}; the transformer's share: {share:.0%}, "
            f"decoding {decode:.0%}, waiting for storage {waited:.0%}, the rest {1 - share - decode - waited:.0%}",
            "",
            "seconds per video by model, mode and size:",
            timed.groupby(["model", "mode", "size"])
            .render_s.agg(videos="count", mean="mean", p50="median", max="max")
            .round(2)
            .reset_index()
            .to_string(index=False),
            "",
            f"slowest {min(SLOWEST, len(timed))}:",
            timed.nlargest(SLOWEST, "render_s")[["id", "model", "mode", "size", "num_segments", "render_s"]]
            .round(2)
            .to_string(index=False),
        ]
    return "\n".join(lines + quality_report(done))


def quality_report(done: pd.DataFrame) -> list[str]:
    """Each signal's distribution over the videos done, the gate's flags, and the worst video by each signal (in
    the gate's direction: the most frozen, the least sharp...)."""
    scored = done.dropna(subset=["quality_motion"]) if "quality_motion" in done else done.iloc[:0]
    if not len(scored):
        return []
    signals = pd.DataFrame({name: scored[f"quality_{name}"] for name in GATE}, index=scored.index)
    signals["cuts"] = scored["quality_cuts"].map(lambda cuts: len(cuts) if cuts is not None else 0)
    distribution = signals.describe(percentiles=[0.05, 0.5, 0.95]).T[["count", "min", "5%", "50%", "95%", "max"]]
    lines = [
        "",
        f"quality signals of {len(scored):,} videos (cuts: how many):",
        distribution.to_string(float_format="{:.4g}".format),
    ]
    flags = scored["quality_flags"].dropna()
    if len(flags):
        counts = pd.Series([flag for row in flags for flag in row], dtype=object).value_counts()
        flagged = sum(1 for row in flags if len(row))
        lines.append(
            f"flagged by the quality gate: {flagged:,} videos"
            + "".join(f"; {name} {count:,}" for name, count in counts.items())
        )
    worst = []
    for name, (side, _) in GATE.items():
        values = signals[name].dropna()
        if len(values):
            at = values.idxmax() if side == "above" else values.idxmin()
            worst.append(
                {
                    "signal": name,
                    "worst": "highest" if side == "above" else "lowest",
                    "id": scored.id[at],
                    "value": values[at],
                }
            )
    lines += ["worst video by each signal:", pd.DataFrame(worst).to_string(index=False, float_format="{:.4g}".format)]
    return lines


def plot(frame: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame.status == "done"].dropna(subset=["render_started", "render_s"])
    ended = (done.render_started + pd.to_timedelta(done.render_s, unit="s")).sort_values()
    figure, (throughput, seconds) = plt.subplots(1, 2, figsize=(11, 4))
    throughput.step(ended, range(1, len(ended) + 1), where="post")
    throughput.set(title="videos done over time", xlabel="time (UTC)", ylabel="videos")
    throughput.tick_params(axis="x", labelrotation=30)
    seconds.hist(done.render_s, bins=min(50, max(5, len(done) // 5)))
    seconds.set(title="seconds per video (render)", xlabel="seconds", ylabel="videos")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _duration(seconds: float) -> str:
    return f"{seconds:,.1f} s" if seconds < 120 else f"{seconds / 60:,.1f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyreels_batch.output.report", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the job's --output (local path or fsspec URL)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw throughput and seconds per video")
    args = parser.parse_args(argv)
    frame = read_report(args.output)
    print(report(frame))
    if args.plot:
        plot(frame, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
