"""The GPU run: the real SkyReels-V2-DF-1.3B-540P architecture in bf16, seconds per video, MFU, peak memory.

    python bench/gpu.py [--out DIR]           # a GPU: bench-1.3b at 544x960, 97 frames, 30 steps (~8 min on an H200)
    python bench/gpu.py --tiny [--out DIR]    # the same code path with tiny-df on the CPU (the test suite runs it)

Runs, each timed on its own (a failing one is recorded and the rest go on):
  a          diffusers: SkyReelsV2DiffusionForcingPipeline.__call__ on the row, as its docs call it
  b          this job's render stage on the same row, texts from the text-encoding stage; its frames against a's
  c          a 177-frame video, two segments, through the render stage (--long-steps: 10 on the GPU, to fit)
  d:...      five-step runs: the render stage as it is, --compile (twice: the first pays the compile),
             --offload model, --offload group, then each attention backend of ATTENTION_BACKENDS that imports
  e          the text encoder: seconds per prompt
  f:...      ten-step videos through the render stage with each step cache of CACHES: passes run and skipped
  g:...      an asynchronous 720P window (97 frames, 25 latent frames, causal blocks of 5), one forward of two blocks
             of the 1.3B configuration: diffusers' dense mask against the flex BlockMask (bench/attention_mask.py)
Per run: seconds per video, seconds inside the transformer, model FLOPs, MFU against the device's bf16 peak, peak
device memory. Also a torch.profiler table of one render step (profile.txt). Writes gpu.json and gpu.md (the
table with the device's name) to --out as it goes, so a run cut short still leaves what it measured; no run starts
after --budget seconds (420 on the GPU: the rest are recorded as skipped), so one device call always returns them.

Needs neither Ray nor PyAV: the stages' code runs in this process and frames are read back from the segment store.
On a machine without them, carry diffusers, pydantic (+ pydantic-core, annotated-types, typing-inspection), ftfy
(+ wcwidth) and importlib-metadata as wheels (the device tool's README).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from diffusers import AutoencoderKLWan, SkyReelsV2DiffusionForcingPipeline

from skyreels_batch.config import PipelineOptions
from skyreels_batch.models import ModelCard, card_for
from skyreels_batch.models.embedded import materialize
from skyreels_batch.output.video import to_uint8
from skyreels_batch.plan import latent_frames
from skyreels_batch.render.pipelines import encode_text, use_shift
from skyreels_batch.render.segments import SegmentStore
from skyreels_batch.render.timing import ForwardTimer, PassCounter
from skyreels_batch.stages import RowStage
from skyreels_batch.stages.encode import EncodePrompts
from skyreels_batch.stages.render import RenderVideos
from skyreels_batch.stages.validate import ValidateRows

PROMPT = "A lighthouse on a rocky cliff at dusk, waves breaking below, the camera slowly orbiting in the wind"
PROMPTS = [f"{PROMPT}, shot {number} of a travel film about the northern coast" for number in range(8)]
# Dense bf16 peaks (vendor specs, TFLOP/s) by device name; --peak-tflops for others. A measured 8192^3 bf16 matmul
# on the H200 here reached 769-798 (the device tool's notes): MFU against the spec is the stricter number.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}
TEXT_TOKENS = 512  # the pipelines pad every prompt to 512 tokens
# diffusers' attention backends worth timing on one GPU, most useful first. Not the hub ones (they fetch kernels from
# the network) nor NPU/XLA; PyTorch's math kernel only on the CPU: on the GPU it materialises the 51,000^2 scores
# of every head.
ATTENTION_BACKENDS = ["_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "sage", "xformers"]
ATTENTION_BACKENDS_CPU = ["_native_math", "flex"]
CACHES = ["none", "first_block:0.1", "first_block:0.2", "taylorseer:4"]


@dataclass(frozen=True)
class Size:
    model: str
    height: int
    width: int
    frames: int
    steps: int
    long_frames: int  # two segments of `window` frames with `overlap` of overlap
    window: int
    overlap: int


FULL = Size("bench-1.3b", 544, 960, 97, 30, 177, 97, 17)
TINY = Size("tiny-df", 64, 96, 17, 4, 29, 17, 5)


def row(size: Size, video_id: str, **changes: object) -> dict:
    return {
        "id": video_id,
        "prompt": PROMPT,
        "num_frames": size.frames,
        "height": size.height,
        "width": size.width,
        "num_inference_steps": size.steps,
        "guidance_scale": 6.0,
        "seed": 42,
        **changes,
    }


def transformer_flops(config: dict, frames: int, height: int, width: int) -> float:
    """Model FLOPs of one transformer forward pass (multiply-adds count 2), from its config and the latent shape.

    tokens S = latent frames x (height / 8 / 2) x (width / 8 / 2): the VAE downsamples 4x in time and 8x in space,
    the patch is 1x2x2. With d = heads x head dim, F = the FFN width and C = 512 text tokens, each of L blocks does
      self-attention  projections 4 S d^2, scores and values 2 S^2 d
      cross-attention projections 2 S d^2 (q, out) + 2 C d^2 (k, v), scores and values 2 S C d
      feed-forward    2 S d F
    multiply-adds; plus the patch embedding, output projection and text projection. Norms, RoPE, modulation and
    the softmax are left out (a few percent). 544x960, 97 frames: 51,000 tokens, 0.61 PFLOP a pass, 37 PFLOP for
    30 steps with guidance (60 passes), 47 s at 790 TFLOP/s."""
    patch_t, patch_h, patch_w = config["patch_size"]
    tokens = (latent_frames(frames) // patch_t) * (height // 8 // patch_h) * (width // 8 // patch_w)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    patch = config["in_channels"] * patch_t * patch_h * patch_w
    block = (
        4 * tokens * d * d
        + 2 * tokens * tokens * d
        + 2 * tokens * d * d
        + 2 * TEXT_TOKENS * d * d
        + 2 * tokens * TEXT_TOKENS * d
        + 2 * tokens * d * config["ffn_dim"]
    )
    edges = tokens * patch * d + tokens * d * config["out_channels"] * patch_t * patch_h * patch_w
    text = TEXT_TOKENS * (config["text_dim"] * d + d * d)
    return 2.0 * (config["num_layers"] * block + edges + text)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.size = TINY if args.tiny else FULL
        self.device = "cpu" if args.tiny else "cuda"
        self.card: ModelCard = card_for(self.size.model)
        self.out = Path(args.out)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        self.threads = (os.cpu_count() or 1) if args.tiny else 4
        # Transformer passes, per transformer (hooks stay for a module's life: read the difference). Keyed by the
        # module itself, weakly: an id() of a freed stage is reused by the next one, whose passes would go uncounted.
        self.counters: weakref.WeakKeyDictionary[torch.nn.Module, PassCounter] = weakref.WeakKeyDictionary()
        self.long_steps = args.long_steps or (self.size.steps if args.tiny else 10)
        self.budget_s = args.budget if args.budget is not None else (None if args.tiny else 420.0)
        self.started = time.perf_counter()
        name = torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        self.report: dict = {"device": name, "peak_tflops": peak, "model": self.card.name, "size": asdict(self.size)}
        self.report["runs"] = []
        self.reference: np.ndarray | None = None  # run a's frames
        self.five_step_frames: np.ndarray | None = None  # run d:default's

    # -- recording ---------------------------------------------------------------------------------------------

    def run(self, name: str, measure: Callable[[], dict]) -> dict:
        """One run, on its own: device memory peak reset first; an error is recorded and the bench goes on."""
        elapsed = time.perf_counter() - self.started
        if self.budget_s is not None and elapsed > self.budget_s:
            result = {"run": name, "error": f"skipped: {elapsed:.0f} s past, over --budget {self.budget_s:.0f} s"}
            self.report["runs"].append(result)
            self.save()
            return result
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            result = {"run": name, **measure()}
        except Exception as error:  # noqa: BLE001 - one failing run must not lose the others' numbers
            result = {"run": name, "error": f"{type(error).__name__}: {error}"}
            traceback.print_exc()
        if self.device == "cuda" and "error" not in result:
            result.setdefault("peak_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))  # g: its own process
        self.report["runs"].append(result)
        self.save()
        print(json.dumps(result), flush=True)
        return result

    def with_flops(self, seconds: float, transformer_s: float, passes: int, frames: int) -> dict:
        flops = passes * transformer_flops(self.card_config(), frames, self.size.height, self.size.width)
        peak = self.report["peak_tflops"]
        mfu = (lambda s: round(flops / s / (peak * 1e12), 3)) if peak else (lambda s: None)
        return {
            "seconds": round(seconds, 3),
            "transformer_s": round(transformer_s, 3),
            "transformer_passes": passes,
            "pflop": float(f"{flops / 1e15:.4g}"),
            "mfu": mfu(seconds),
            "mfu_in_transformer": mfu(transformer_s),
        }

    def card_config(self) -> dict:
        return json.loads((materialize(self.card) / "transformer" / "config.json").read_text())

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "gpu.md").write_text(markdown(self.report))

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    # -- the runs ----------------------------------------------------------------------------------------------

    def build(self) -> dict:
        started = time.perf_counter()
        directory = materialize(self.card)
        return {"seconds": round(time.perf_counter() - started, 1), "directory": str(directory)}

    def diffusers_call(self) -> dict:
        """a: the plain pipeline, loaded and called the way its docs show (bf16, the VAE in fp32)."""
        directory = materialize(self.card)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        vae = AutoencoderKLWan.from_pretrained(directory, subfolder="vae", dtype=torch.float32)
        pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(directory, vae=vae, dtype=dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        use_shift(pipe, self.card.defaults.shift)
        counter, timer, spec = PassCounter(pipe.transformer), ForwardTimer(pipe.transformer), row(self.size, "a")
        self.sync()
        started = time.perf_counter()
        video = pipe(
            prompt=spec["prompt"],
            negative_prompt=self.card.defaults.negative_prompt,
            height=spec["height"],
            width=spec["width"],
            num_frames=spec["num_frames"],
            num_inference_steps=spec["num_inference_steps"],
            guidance_scale=spec["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(spec["seed"]),
            output_type="np",
        ).frames[0]
        self.sync()
        seconds = time.perf_counter() - started
        self.reference = to_uint8(video)
        del pipe, vae
        return self.with_flops(seconds, timer.seconds, counter.passes, self.size.frames)

    def stages(self, options: PipelineOptions | None = None) -> tuple[EncodePrompts, RenderVideos]:
        card, output = self.card, str(self.work)
        encoder = EncodePrompts(card, output=output, device=self.device, torch_threads=self.threads, options=options)
        render = RenderVideos(card, output=output, device=self.device, torch_threads=self.threads, options=options)
        loads = self.report.setdefault("model_loads", [])  # fetch, read and to-device seconds of each stage's load
        loads += [{**asdict(stage.model_load), "options": repr(options)} for stage in (encoder, render)]
        self.save()
        return encoder, render

    def render(self, encoder: EncodePrompts, render: RenderVideos, spec: dict) -> tuple[dict, np.ndarray]:
        """One row through validate -> encode -> render, as the job runs it; its frames, read back."""
        SegmentStore(str(self.work), spec["id"]).remove()
        validated = ValidateRows(self.card, max_frames=10_000)(pa.Table.from_pylist([spec]))
        transformer = render.pipeline.transformer
        if transformer not in self.counters:
            self.counters[transformer] = PassCounter(transformer)
        counter = self.counters[transformer]
        before = counter.passes
        result = render(encoder(validated)).to_pylist()[0]
        if result["error"]:
            raise RuntimeError(result["error"])
        frames = np.stack(list(SegmentStore(str(self.work), spec["id"]).frames(result["num_segments"])))
        timing = self.with_flops(
            result["render_s"], result["transformer_s"], counter.passes - before, spec["num_frames"]
        )
        return {**timing, "segments": result["num_segments"]}, frames

    def project_path(self, encoder: EncodePrompts, render: RenderVideos) -> dict:
        """b: the render stage on a's row; frames against a's."""
        timing, frames = self.render(encoder, render, row(self.size, "b"))
        if self.reference is None:
            return {**timing, "vs_a": "a did not run"}
        difference = np.abs(frames.astype(np.int16) - self.reference.astype(np.int16))
        mse = float(np.mean(difference.astype(np.float64) ** 2))
        psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
        return {**timing, "max_abs_diff": int(difference.max()), "psnr_db": round(psnr, 2)}

    def long_video(self, encoder: EncodePrompts, render: RenderVideos) -> dict:
        """c: two segments, chained by their overlap latents."""
        spec = row(
            self.size,
            "c",
            num_frames=self.size.long_frames,
            base_num_frames=self.size.window,
            overlap_history=self.size.overlap,
            num_inference_steps=self.long_steps,
        )
        timing, frames = self.render(encoder, render, spec)
        assert len(frames) == self.size.long_frames, len(frames)
        return timing

    def text_encoder(self, encoder: EncodePrompts) -> dict:
        """e: seconds per prompt, each a new text (nothing cached)."""
        encode_text(encoder.pipeline, "warm-up")
        self.sync()
        started = time.perf_counter()
        for text in PROMPTS:
            encode_text(encoder.pipeline, text)
        self.sync()
        return {"seconds_per_prompt": round((time.perf_counter() - started) / len(PROMPTS), 4)}

    def profile(self, encoder: EncodePrompts, render: RenderVideos) -> dict:
        """One render step under torch.profiler: where a step's time goes (attention, scheduler steps, VAE). On the
        stage's own torch thread, where its work runs (TorchRowStage): a profiler only sees its own thread."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        spec = row(self.size, "profile", num_inference_steps=1)
        self.render(encoder, render, {**spec, "id": "profile-warm-up"})
        encoded = encoder(ValidateRows(self.card, max_frames=10_000)(pa.Table.from_pylist([spec])))

        def profiled() -> torch.profiler.profile:
            with torch.profiler.profile(activities=activities) as profiler:
                RowStage.__call__(render, encoded)  # the stage's work, already on its thread
            return profiler

        profiler = render.torch_thread.submit(profiled).result()
        sort = "cuda_time_total" if self.device == "cuda" else "cpu_time_total"
        (self.out / "profile.txt").write_text(profiler.key_averages().table(sort_by=sort, row_limit=25) + "\n")
        return {"table": "profile.txt"}

    def main(self) -> None:
        """The runs, most important first: the budget cuts from the end."""
        self.run("build", self.build)
        self.run("a", self.diffusers_call)
        self.default_stage_runs()
        self.cache_runs()
        self.attention_mask_runs()
        for label, options in (
            ("compile", PipelineOptions(compile=True)),
            ("offload model", PipelineOptions(offload="model")),
            ("offload group", PipelineOptions(offload="group")),
        ):
            self.option_runs(label, options)
        self.attention_runs()
        print(markdown(self.report))

    def attention_runs(self) -> None:
        encoder, render = self.stages()
        for backend in ATTENTION_BACKENDS + (ATTENTION_BACKENDS_CPU if self.device == "cpu" else []):
            self.run(f"d:attention {backend}", lambda backend=backend: self.with_backend(encoder, render, backend))

    def default_stage_runs(self) -> None:
        """b, c, the five-step runs of the stage as it is and with each attention backend, e, the profile: one set
        of stages, loaded once (and freed when this returns)."""
        encoder, render = self.stages()
        self.run("b", lambda: self.project_path(encoder, render))
        self.run("c", lambda: self.long_video(encoder, render))
        self.run("d:default", lambda: self.five(encoder, render, "default"))
        self.run("e", lambda: self.text_encoder(encoder))
        self.run("profile", lambda: self.profile(encoder, render))

    def cache_runs(self) -> None:
        """f: each step cache on a ten-step video; frames against the uncached one's."""
        encoder, render = self.stages()
        counter, uncached = PassCounter(render.pipeline.transformer), {}

        def cached(spec: str) -> dict:
            before = (counter.passes, counter.skipped)
            changes = {"num_inference_steps": 10} | ({} if spec == "none" else {"cache": spec})
            timing, frames = self.render(encoder, render, row(self.size, f"f-{spec.replace(':', '-')}", **changes))
            uncached.setdefault("frames", frames)
            difference = np.abs(frames.astype(np.int16) - uncached["frames"].astype(np.int16)).max()
            passes, skipped = counter.passes - before[0], counter.skipped - before[1]
            return {**timing, "passes": passes, "skipped": skipped, "max_abs_diff_vs_none": int(difference)}

        for spec in CACHES:
            self.run(f"f:cache {spec}", lambda spec=spec: cached(spec))

    def attention_mask_runs(self) -> None:
        """g: bench/attention_mask.py's paths at the whole 720P window (each in a fresh process)."""
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import attention_mask

        if self.device == "cpu":
            shape = argparse.Namespace(latent_frames=4, height=64, width=96, layers=1)
        else:
            shape = argparse.Namespace(latent_frames=25, height=720, width=1280, layers=2)
        for path in ["dense", "block mask"]:
            self.run(
                f"g:async 720P forward, {path}", lambda path=path: attention_mask.measure(path, shape, self.device)
            )

    def option_runs(self, label: str, options: PipelineOptions) -> None:
        encoder, render = self.stages(options)
        if options.compile:
            self.run("d:compile (first video)", lambda: self.five(encoder, render, "compile-first"))
        self.run(f"d:{label}", lambda: self.five(encoder, render, label))

    def five(self, encoder: EncodePrompts, render: RenderVideos, label: str) -> dict:
        """A five-step video; its frames against the stage-as-it-is five-step run's (the first one made)."""
        timing, frames = self.render(
            encoder, render, row(self.size, f"d-{label.replace(' ', '-')}", num_inference_steps=5)
        )
        if self.five_step_frames is None:
            self.five_step_frames = frames
        difference = np.abs(frames.astype(np.int16) - self.five_step_frames.astype(np.int16)).max()
        return {**timing, "max_abs_diff_vs_default": int(difference)}

    def with_backend(self, encoder: EncodePrompts, render: RenderVideos, backend: str) -> dict:
        transformer = render.pipeline.transformer
        try:
            transformer.set_attention_backend(backend)
            return self.five(encoder, render, backend)
        finally:
            transformer.set_attention_backend("native")


def markdown(report: dict) -> str:
    columns = ["run", "seconds", "transformer_s", "pflop", "mfu", "mfu_in_transformer", "peak_gib", "psnr_db"]
    lines = [
        f"Device: {report['device']} (bf16 peak {report['peak_tflops']} TFLOP/s); model {report['model']}, "
        f"{report['size']['height']}x{report['size']['width']}, {report['size']['frames']} frames, "
        f"{report['size']['steps']} steps.",
        "",
        "| " + " | ".join(columns + ["note"]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for run in report["runs"]:
        cells = ["" if run.get(column) is None else str(run[column]) for column in columns]
        note = run.get("error") or ", ".join(
            f"{key} {value}"
            for key, value in run.items()
            if key in ("max_abs_diff", "max_abs_diff_vs_default", "seconds_per_prompt", "segments", "table")
        )
        lines.append("| " + " | ".join(cells + [note[:120]]) + " |")
    if report.get("model_loads"):
        lines += ["", "| stage | options | fetch s | read s | to device s |", "|---|---|---|---|---|"]
        for load in report["model_loads"]:
            seconds = (f"{load[key]:.2f}" for key in ("fetch_s", "read_s", "to_device_s"))
            lines.append(f"| {load['stage']} | {load['options']} | " + " | ".join(seconds) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-df on the CPU: the same code path, in seconds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where gpu.json etc. go")
    parser.add_argument("--long-steps", type=int, help="steps of run c (default: the row's, 30 on the GPU)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--budget", type=float, help="start no run after this many seconds (GPU: 420, CPU: none)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no GPU here: use --tiny for the CPU run")
    Bench(args).main()


if __name__ == "__main__":
    main()
