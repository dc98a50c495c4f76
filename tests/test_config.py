"""Resources and pool sizes: decided in one place from the job config and the cluster."""

from __future__ import annotations

import argparse

import pytest

from skyreels_batch.config import JobConfig, PipelineOptions
from skyreels_batch.job.cli import build_parser, job_config, parse_resource, parse_workers
from skyreels_batch.job.cluster import Capacity
from skyreels_batch.job.resources import plan_resources

TWO_CPUS = Capacity(nodes=({"CPU": 2.0},))
EIGHT_GPUS = Capacity(nodes=({"CPU": 64.0, "GPU": 8.0},))
ONE_GPU = Capacity(nodes=({"CPU": 8.0, "GPU": 1.0},))


def test_cpu_cluster_gets_fractional_cpus_leaving_room_for_reads() -> None:
    resources = plan_resources(JobConfig(manifest="m", min_workers=2, max_workers=2), TWO_CPUS)
    assert resources.device == "cpu"
    assert resources.render_num_gpus == 0
    # Two actors and a read task must fit on two cores at once; so must the render pass's three pools.
    assert 2 * resources.render_num_cpus + resources.read_num_cpus <= 2.0
    assert 2 * resources.render_num_cpus + resources.text_num_cpus + resources.write_num_cpus <= 2.0
    assert resources.torch_threads == 1


def test_single_cpu_actor_uses_every_core_for_torch() -> None:
    resources = plan_resources(JobConfig(manifest="m"), TWO_CPUS)
    assert (resources.min_workers, resources.max_workers, resources.torch_threads) == (1, 1, 2)
    assert resources.render_num_cpus < 2.0


def test_gpu_cluster_gets_one_gpu_per_actor_and_one_actor_per_gpu_by_default() -> None:
    resources = plan_resources(JobConfig(manifest="m"), EIGHT_GPUS)
    assert resources.device == "cuda"
    # A render actor per GPU, and a text encoder fits beside one: on a one-GPU node neither waits for the other.
    assert 0.5 < resources.render_num_gpus < 1 and resources.render_num_gpus + resources.text_num_gpus == 1
    assert (resources.min_workers, resources.max_workers) == (1, 8)
    pinned = plan_resources(JobConfig(manifest="m", min_workers=2, max_workers=16), EIGHT_GPUS)
    assert (pinned.min_workers, pinned.max_workers) == (2, 16)


@pytest.mark.parametrize(("text", "parsed"), [("3", (3, 3)), ("1:4", (1, 4)), ("2:auto", (2, None))])
def test_workers_flag(text: str, parsed: tuple) -> None:
    assert parse_workers(text) == parsed


@pytest.mark.parametrize("text", ["0", "3:2", "a:b", "-1:2"])
def test_workers_flag_rejects_nonsense(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_workers(text)


def test_render_resources_reach_the_render_pool_on_cpu_and_gpu_clusters() -> None:
    assert parse_resource("render=2") == ("render", 2.0) and parse_resource("render") == ("render", 1.0)
    config = JobConfig(manifest="m", render_resources={"render": 1.0})
    assert plan_resources(config, TWO_CPUS).render_resources == {"render": 1.0}
    assert plan_resources(config, ONE_GPU).render_resources == {"render": 1.0}


def test_pipeline_flags_reach_the_job_config_and_bad_values_are_refused(capsys: pytest.CaptureFixture) -> None:
    args = ["m.parquet", "--offload", "group", "--compile", "--attention-backend", "_native_math"]
    config = job_config(build_parser().parse_args(args))
    assert config.pipeline == PipelineOptions(offload="group", compile=True, attention_backend="_native_math")
    assert job_config(build_parser().parse_args(["m.parquet"])).pipeline == PipelineOptions()
    assert job_config(build_parser().parse_args(["m.parquet", "--manifest-order"])).longest_first is False
    for bad in (["--offload", "sequential"], ["--attention-backend", "fastest"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["m.parquet", *bad])
    errors = capsys.readouterr().err
    assert "invalid choice: 'sequential'" in errors and "_native_math" in errors  # the valid names are listed


# For every flag of the command line, a value other than its default (the flag's option string -> its arguments).
NON_DEFAULT = {
    "--output": ["s3://bucket/out"],
    "--model": ["tiny-t2v"],
    "--workers": ["2:4"],
    "--text-workers": ["2"],
    "--crf": ["30"],
    "--lossless": [],
    "--max-frames": ["97"],
    "--save-latents": [],
    "--max-retries": ["0"],
    "--stop-grace": ["5"],
    "--index-interval": ["2"],
    "--render-resource": ["render=0.5"],
    "--device": ["cpu"],
    "--manifest-order": [],
    "--offload": ["model"],
    "--compile": [],
    "--attention-backend": ["_native_math"],
    "--gpus-per-video": ["2"],
    "--quality-gate": ["frozen_fraction=0.3"],
    "--keep-flagged": [],
}


def test_every_flag_reaches_the_job_config() -> None:
    parser = build_parser()
    flags = {action.option_strings[0] for action in parser._actions if action.option_strings} - {"-h"}
    # --dry-run picks what main() does with the config, not the config.
    assert flags - {"--dry-run"} == set(NON_DEFAULT), "a new flag needs a value here"
    default = job_config(parser.parse_args(["m.parquet"]))
    for flag, values in NON_DEFAULT.items():
        assert job_config(parser.parse_args(["m.parquet", flag, *values])) != default, f"{flag} changes nothing"
    two = plan_resources(job_config(parser.parse_args(["m.parquet", "--text-workers", "2"])), TWO_CPUS)
    assert two.text_workers == 2 and plan_resources(default, TWO_CPUS).text_workers == 1
