"""`tcpass generate`: one image from a diffusers pipeline, with or without a TokenCache plan."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tcpass.adapters import ADAPTERS, quiet_load_kwargs


@dataclass
class Generated:
    image: object  # PIL.Image
    seconds: float  # wall time of the pipeline call
    steps: dict  # StepKind value -> count (empty without a plan)


def load_pipeline(model: str | Path, dtype: torch.dtype = torch.float32):
    """``DiffusionPipeline.from_pretrained`` on a pipeline directory or hub id; its transformer must be supported.

    A pipeline saved with a transformed transformer loads with it (its saved plan in force).
    """
    import diffusers

    from tcpass.runtime import TokenCacheTransformer  # imported so diffusers can load saved transforms

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
) -> Generated:
    """Run ``pipe`` once (its own progress bar); with ``plan``, its transformer runs TokenCache.

    A pipeline whose transformer is already transformed (loaded from a saved transform) runs its own
    plan, or ``plan`` in its place.
    """
    from tcpass.runtime import TokenCacheTransformer, transform

    original = pipe.transformer
    tm = original if isinstance(original, TokenCacheTransformer) else None
    base = original.transformer if tm is not None else original
    if plan is not None:
        pipe.transformer = tm = transform(base, plan, plan_dir=plan_dir)
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed)}
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
        image = pipe(**kwargs).images[0]
        seconds = time.perf_counter() - start
    finally:
        pipe.transformer = original
    counts = {kind.value: n for kind, n in tm.step_counts.items()} if tm is not None else {}
    if tm is original:  # counts of this call only
        counts = {k: n - before.get(k, 0) for k, n in counts.items()}
    return Generated(image, seconds, counts)
