"""The shipped reference models: class-conditional DiTs trained here, with their own evaluators.

`reference("digits")`, `reference("emoji")` (and the other rows of `REFERENCE_MODELS`) gives everything a demo or a
quality bench needs about one model: its loader, its independent classifier (class accuracy and the
feature space of Fréchet distances), its held-out real images, its labels and its default plan.
"""

from __future__ import annotations

import filecmp
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn

from tcpass.zoo import digits, emoji
from tcpass.zoo.digits import (
    NULL_LABEL,
    DigitsClassifier,
    digits_split,
    load_classifier,
    load_reference_model,
    reference_model_dir,
)


@dataclass(frozen=True)
class ReferenceModel:
    """One shipped reference model.

    Attributes:
        name: registry key (``tcpass demo --model NAME``).
        class_names: one display name per class label 0..num_classes-1.
        null_label: the class label classifier-free guidance uses for "no class".
        image_shape: (channels, height, width) of a sample, pixel space, values in [-1, 1].
        load_model: ``(directory or None) -> DiTTransformer2DModel`` (``None``: the shipped weights).
        load_classifier: ``() -> nn.Module`` with ``forward`` (logits) and ``features`` (Fréchet space).
        held_out: ``() -> (images [n, C, H, W] in [-1, 1], labels [n])``, never used for training.
        default_plan: the shipped TokenCache plan (token caching: `tcpass serve`'s default, the quality bench).
        demo_plan: the plan `tcpass demo` uses: the best plan calibrated for this model (a step plan
            with fitted forecasts, `tcpass calibrate steps --target-speedup 2.0`; on emoji with
            ``--keep-steps``, since without it the search picks 25 plain DDIM steps there).
        model_dir: ``() -> Path`` of the shipped weights (`sampler_for` recognises it).
        guidance_interval: model timesteps ``(lo, hi)`` its sampler applies classifier-free guidance at
            (`tcpass.sampling.guided_sample`); ``None``: every step. Every bench, the demo and calibration
            of the shipped weights sample this model with it.
    """

    name: str
    class_names: tuple[str, ...]
    null_label: int
    image_shape: tuple[int, int, int]
    load_model: Callable[[Path | None], nn.Module]
    load_classifier: Callable[[], nn.Module]
    held_out: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    default_plan: Path
    demo_plan: Path
    model_dir: Callable[[], Path]
    guidance_interval: tuple[float, float] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _digits_held_out() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, images, labels = digits_split()
    return images, labels


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    "digits": ReferenceModel(
        name="digits",
        class_names=tuple(str(i) for i in range(digits.NUM_CLASSES)),
        null_label=digits.NULL_LABEL,
        image_shape=(1, digits.IMAGE_SIZE, digits.IMAGE_SIZE),
        load_model=load_reference_model,
        load_classifier=load_classifier,
        held_out=_digits_held_out,
        default_plan=Path(__file__).parent / "digits_plan.json",
        demo_plan=Path(__file__).parent / "digits_demo_plan.json",
        model_dir=reference_model_dir,
    ),
    "emoji": ReferenceModel(
        name="emoji",
        class_names=emoji.CLASS_NAMES,
        null_label=emoji.NULL_LABEL,
        image_shape=(3, emoji.IMAGE_SIZE, emoji.IMAGE_SIZE),
        load_model=emoji.load_reference_model,
        load_classifier=emoji.load_classifier,
        held_out=emoji.held_out,
        default_plan=Path(__file__).parent / "emoji_plan.json",
        demo_plan=Path(__file__).parent / "emoji_demo_plan.json",
        model_dir=emoji.reference_model_dir,
        # guidance at t in [100, 700) only: more classes recognised and less mode collapse than at every
        # step (bench/results/emoji_guidance_interval.json)
        guidance_interval=emoji.GUIDANCE_INTERVAL,
    ),
}


def reference(name: str) -> ReferenceModel:
    """The reference model called ``name``; raises ``ValueError`` listing the known ones."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; known: {sorted(REFERENCE_MODELS)}.")
    return REFERENCE_MODELS[name]


def _same_weights(a: Path, b: Path) -> bool:
    """Two model directories whose diffusers weights files are identical, byte for byte."""
    a, b = a / SAFETENSORS_WEIGHTS_NAME, b / SAFETENSORS_WEIGHTS_NAME
    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def sampler_for(model_path: str | Path | None) -> ReferenceModel | None:
    """The reference model whose shipped weights are at ``model_path`` (``None``: the default, digits), or
    ``None`` for any other directory; its ``guidance_interval`` is the sampler to calibrate under. A copy of a
    shipped model's directory elsewhere (the same weights file, byte for byte) is that model too."""
    if model_path is None:
        return REFERENCE_MODELS["digits"]
    path = Path(model_path).resolve()
    for ref in REFERENCE_MODELS.values():
        if ref.model_dir().resolve() == path or _same_weights(path, ref.model_dir()):
            return ref
    return None


__all__ = [
    "NULL_LABEL",
    "REFERENCE_MODELS",
    "DigitsClassifier",
    "ReferenceModel",
    "digits_split",
    "load_classifier",
    "load_reference_model",
    "reference",
    "reference_model_dir",
    "sampler_for",
]
