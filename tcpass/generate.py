"""`tcpass generate`: one image or video from a diffusers pipeline, with or without a TokenCache plan."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tcpass.adapters import ADAPTERS, quiet_load_kwargs
from tcpass.files import write_atomic

# transformers whose pipelines return videos (``.frames``), not images (``.images``)
VIDEO_TRANSFORMERS = frozenset(
    {
        "WanTransformer3DModel",
        "HunyuanVideoTransformer3DModel",
        "CogVideoXTransformer3DModel",
        "LTXVideoTransformer3DModel",
    }
)
VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")  # .mp4 through imageio-ffmpeg, animated .webp / .gif through Pillow
VIDEO_EXTRA = "pip install 'tcpass[video]'"
DEFAULT_FPS = 16  # Wan's


@dataclass
class Generated:
    image: object  # PIL.Image; a video's first frame
    seconds: float  # wall time of the pipeline call
    steps: dict  # StepKind value -> count (empty without a plan)
    frames: list | None = None  # a video's frames, PIL images in order; None for an image pipeline


def load_pipeline(model: str | Path, dtype: torch.dtype = torch.float32):
    """``DiffusionPipeline.from_pretrained`` on a pipeline directory or hub id; its transformer must be supported.

    A pipeline saved with a transformed transformer loads with it (its saved plan in force).
    """
    import diffusers

    from tcpass.torch_runtime import TokenCacheTransformer  # imported so diffusers can load saved transforms

    root = Path(model)
    if root.exists() and not (root / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{root}: no model_index.json; `tcpass generate` needs a diffusers pipeline directory "
            "(a saved pipeline, not a bare transformer) or a hub id."
        )
    kwargs = {}
    if root.exists():
        import json

        index = json.loads((root / "model_index.json").read_text())
        # components saved as None (SD3 without its T5 encoder) must be passed as None explicitly
        kwargs = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, **kwargs, **quiet_load_kwargs())
    transformer = pipe.transformer
    if isinstance(transformer, TokenCacheTransformer):
        transformer = transformer.transformer
    name = type(transformer).__name__
    if name not in ADAPTERS:
        raise TypeError(f"{model}: the pipeline's transformer is {name}; tcpass supports {sorted(ADAPTERS)}.")
    return pipe


def is_video_pipeline(pipe) -> bool:
    """Whether ``pipe``'s transformer (transformed or not) is one of `VIDEO_TRANSFORMERS`."""
    from tcpass.torch_runtime import TokenCacheTransformer

    transformer = pipe.transformer
    if isinstance(transformer, TokenCacheTransformer):
        transformer = transformer.transformer
    return type(transformer).__name__ in VIDEO_TRANSFORMERS


def check_output(pipe, out: Path) -> None:
    """Raise ``ValueError``, before the run, when ``pipe`` cannot write to ``out``: a video pipeline needs a
    `VIDEO_SUFFIXES` file (.mp4 also imageio-ffmpeg), an image pipeline a format Pillow writes."""
    suffix = out.suffix.lower()
    if not is_video_pipeline(pipe):
        from PIL import Image

        if suffix not in Image.registered_extensions():
            raise ValueError(f"--out {out}: {type(pipe).__name__} makes an image; use an image suffix such as .png.")
        return
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"--out {out}: {type(pipe).__name__} makes a video; use {', '.join(VIDEO_SUFFIXES)} "
            "(.mp4 needs imageio-ffmpeg, animated .webp and .gif need only Pillow)."
        )
    if suffix == ".mp4":
        try:
            import imageio  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f"--out {out}: writing MP4 needs imageio-ffmpeg ({e.name} is missing): {VIDEO_EXTRA}, "
                "or write an animated .webp or .gif instead."
            ) from e


def write_video(frames: list, out: Path, fps: int = DEFAULT_FPS) -> None:
    """Write ``frames`` (PIL images) to ``out`` at ``fps`` frames per second, atomically: .mp4 (H.264) through
    imageio-ffmpeg, .webp / .gif as an animation that loops, through Pillow."""
    suffix = out.suffix.lower()
    if suffix == ".mp4":
        import imageio.v3 as iio

        pixels = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
        data = iio.imwrite("<bytes>", pixels, extension=".mp4", plugin="FFMPEG", fps=fps)
    elif suffix in (".webp", ".gif"):
        buffer = io.BytesIO()
        first, *rest = frames
        duration_ms = round(1000 / fps)
        first.save(buffer, format=suffix[1:].upper(), save_all=True, append_images=rest, duration=duration_ms, loop=0)
        data = buffer.getvalue()
    else:
        raise ValueError(f"{out}: a video is written as {', '.join(VIDEO_SUFFIXES)}, not {out.suffix or 'no suffix'}.")
    write_atomic(out, data)


def write_image(image, out: Path) -> None:
    """Write ``image`` (PIL) to ``out`` atomically, in the format its suffix names."""
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions()[out.suffix.lower()])
    write_atomic(out, buffer.getvalue())


def _pil_frames(video) -> list:
    """A pipeline's video (PIL images, or an array ``[F, H, W, 3]`` in 0..1) as PIL images."""
    from PIL import Image

    if isinstance(video, np.ndarray):
        pixels = (video.astype(np.float32).clip(0, 1) * 255).round().astype(np.uint8)
        return [Image.fromarray(frame) for frame in pixels]
    return list(video)


def generate(
    pipe,
    plan=None,
    plan_dir: Path | None = None,
    *,
    prompt: str | None = None,
    class_label: int | None = None,
    steps: int = 28,
    seed: int = 0,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
) -> Generated:
    """Run ``pipe`` once (its own progress bar); with ``plan``, its transformer runs TokenCache.

    A pipeline whose transformer is already transformed (loaded from a saved transform) runs its own
    plan, or ``plan`` in its place. A video pipeline (`is_video_pipeline`) makes ``frames`` frames
    (its ``num_frames``; default: the pipeline's) and returns them in ``Generated.frames``.
    """
    from tcpass.torch_runtime import TokenCacheTransformer, transform

    original = pipe.transformer
    tm = original if isinstance(original, TokenCacheTransformer) else None
    base = original.transformer if tm is not None else original
    video = is_video_pipeline(pipe)
    if frames is not None and not video:
        raise ValueError(f"--frames {frames}: {type(pipe).__name__} makes an image, not a video; leave --frames out.")
    if plan is not None:
        pipe.transformer = tm = transform(base, plan, plan_dir=plan_dir)
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed)}
    if video:
        kwargs["output_type"] = "np"  # every video pipeline's array form; `_pil_frames` takes PIL lists too
        if frames is not None:
            kwargs["num_frames"] = frames
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if type(base).__name__ == "DiTTransformer2DModel":
        if class_label is None:
            raise ValueError("a DiT pipeline is class-conditional: pass --class-label (an ImageNet class id).")
        kwargs["class_labels"] = [class_label]
    else:
        if prompt is None:
            raise ValueError(f"{type(pipe).__name__} is text-to-image: pass --prompt.")
        kwargs["prompt"] = prompt
        if height is not None:
            kwargs["height"] = height
        if width is not None:
            kwargs["width"] = width
    before = {kind.value: n for kind, n in tm.step_counts.items()} if tm is not None else {}
    try:
        start = time.perf_counter()
        output = pipe(**kwargs)
        seconds = time.perf_counter() - start
    finally:
        pipe.transformer = original
    counts = {kind.value: n for kind, n in tm.step_counts.items()} if tm is not None else {}
    if tm is original:  # counts of this call only
        counts = {k: n - before.get(k, 0) for k, n in counts.items()}
    if video:
        video_frames = _pil_frames(output.frames[0])
        return Generated(video_frames[0], seconds, counts, video_frames)
    return Generated(output.images[0], seconds, counts)
