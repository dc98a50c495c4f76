"""The segment plan of a video: a pure function of the row's parameters, with diffusers' own arithmetic.

A long video (`num_frames > base_num_frames` with `overlap_history`) is generated as windows of at most
`base_num_frames`; each window after the first starts with the last `overlap_history` frames of what came before
(as latents) and adds the rest. In latent frames (the VAE compresses time 4x, L = (n - 1) // 4 + 1):

    n_iter = 1 + (L - B - 1) // (B - O) + 1          B, O: base and overlap in latent frames
    window k > 0 starts at k (B - O) and is min(L - k (B - O) - O + O, B) = min(remaining + O, B) long

A plan depends on a handful of parameters, so each distinct plan is computed once (`plan_video` is cached): a
million-row manifest has a few dozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

TEMPORAL_FACTOR = 4


def latent_frames(frames: int) -> int:
    return (frames - 1) // TEMPORAL_FACTOR + 1


@dataclass(frozen=True)
class Segment:
    index: int
    latent_start: int  # first latent frame of the window, overlap included
    latent_end: int  # one past its last latent frame
    overlap: int  # latent frames at the window's start that come from the previous window
    end_frame: int  # 1 when a given last frame's latent rides at the window's end (flf2v, final segment)
    new_frames: int  # pixel frames this segment adds to the video
    iterations: int  # denoising iterations (rows of diffusers' timestep matrix)

    @property
    def length(self) -> int:
        return self.latent_end - self.latent_start

    @property
    def denoised_length(self) -> int:
        """Latent frames in the window the transformer sees, a given last frame included."""
        return self.length + self.end_frame


@dataclass(frozen=True)
class VideoPlan:
    num_frames: int  # frames the video adds (for v2v, after the clip it continues)
    continues_clip: bool
    num_latent_frames: int  # the latent timeline, a continued clip's overlap included
    window_latent_frames: int  # diffusers' base latent frames for this video
    overlap_latent_frames: int
    segments: tuple[Segment, ...]
    cost: int  # transformer forward passes, classifier-free guidance counted twice

    @property
    def chained(self) -> bool:
        """Whether diffusers would run this as its long-video loop (windows continuing from an overlap)."""
        return len(self.segments) > 1 or self.continues_clip

    @property
    def model_num_frames(self) -> int:
        """The `num_frames` diffusers' arithmetic is given: the whole latent timeline in pixel frames."""
        return (self.num_latent_frames - 1) * TEMPORAL_FACTOR + 1

    def as_json(self, video_id: str) -> dict:
        return {
            "id": video_id,
            "num_frames": self.num_frames,
            "segments": [
                {k: v for k, v in asdict(s).items() if k in ("index", "latent_start", "latent_end", "new_frames")}
                for s in self.segments
            ],
            "cost": self.cost,
        }


def denoising_iterations(
    *, num_latent_frames: int, num_inference_steps: int, ar_step: int, num_pre_ready: int, causal_block_size: int
) -> int:
    """Rows of diffusers' timestep matrix (`generate_timestep_matrix`): the transformer passes, per guidance branch,
    of one window. Its loop advances the window's causal blocks until every one has taken all S steps: the first
    block still waiting takes S rows, and each later block finishes min(ar_step, S) rows after the one before it
    (ar_step behind it while that one runs, or starting from zero when ar_step > S). Blocks of the overlap that
    fill a whole causal block are ready from the start. tests/test_plan.py checks this against diffusers' loop."""
    steps = num_inference_steps
    waiting = num_latent_frames // causal_block_size - num_pre_ready // causal_block_size
    if waiting <= 0:
        return 0
    return steps + (waiting - 1) * min(ar_step, steps)


@lru_cache(maxsize=1024)
def plan_video(
    *,
    num_frames: int,
    base_num_frames: int,
    overlap_history: int | None,
    num_inference_steps: int,
    guidance_scale: float,
    ar_step: int = 0,
    causal_block_size: int = 1,
    first_frame: bool = False,
    last_frame: bool = False,
    continues_clip: bool = False,
) -> VideoPlan:
    """`first_frame`: the first latent frame is a given image (i2v, flf2v), ready from the start. `last_frame`: a
    given last image's latent frame rides at the end of the final window, frozen (flf2v). `continues_clip` (v2v):
    the video continues a given clip; `num_frames` counts the new frames (a multiple of 4) and the first window
    starts with the clip's last `overlap_history` frames as latents, as diffusers' video-to-video does."""
    if continues_clip:
        overlap = latent_frames(overlap_history)
        total = overlap + num_frames // TEMPORAL_FACTOR
    else:
        total = latent_frames(num_frames)
    long_video = overlap_history is not None and (num_frames > base_num_frames or continues_clip)
    if long_video:
        base, overlap = latent_frames(base_num_frames), latent_frames(overlap_history)
        if overlap >= base:
            raise ValueError(f"overlap_history ({overlap_history}) must be shorter than base_num_frames")
        count = 1 + (total - base - 1) // (base - overlap) + 1
    else:
        base, overlap, count = total, 0, 1
    passes_per_iteration = 2 if guidance_scale > 1.0 else 1

    segments = []
    for index in range(count):
        if index == 0 and not continues_clip:
            start, length, prefix = 0, base, 0
            ready = int(first_frame)  # diffusers does not align the image's latent to causal blocks
        else:
            new_start = index * (base - overlap) + overlap
            start, length, prefix = new_start - overlap, min(total - new_start + overlap, base), overlap
            ready = _aligned(prefix, causal_block_size)
        end = int(last_frame and index == count - 1)
        iterations = denoising_iterations(
            num_latent_frames=length + end,
            num_inference_steps=num_inference_steps,
            ar_step=ar_step,
            num_pre_ready=ready,
            causal_block_size=causal_block_size,
        )
        new_latents = length - prefix
        new_frames = new_latents * TEMPORAL_FACTOR if prefix else (new_latents - 1) * TEMPORAL_FACTOR + 1
        segments.append(Segment(index, start, start + length, prefix, end, new_frames, iterations))
    return VideoPlan(
        num_frames=num_frames,
        continues_clip=continues_clip,
        num_latent_frames=total,
        window_latent_frames=base,
        overlap_latent_frames=overlap,
        segments=tuple(segments),
        cost=sum(segment.iterations for segment in segments) * passes_per_iteration,
    )


def _aligned(prefix: int, causal_block_size: int) -> int:
    """diffusers drops prefix frames that do not fill a whole causal block."""
    return prefix - prefix % causal_block_size
