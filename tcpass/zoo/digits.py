"""Data, evaluator and loaders for the reference model (scikit-learn's bundled handwritten digits).

The data are the 1,797 real 8x8 handwritten digits that ship inside scikit-learn (UCI optdigits),
upsampled to 32x32 so a patch-2 DiT sees 256 tokens per image, like DiT-XL/2 at 256 px. A fixed,
stratified split keeps 1,397 images for training and 400 held out (two disjoint halves of 200,
so real-vs-real distances can be reported next to generated-vs-real ones).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tcpass.zoo.loading import load_dit, load_weights

IMAGE_SIZE = 32
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the class-embedding row classifier-free guidance uses for "no class"
HELD_OUT = 400
SPLIT_SEED = 0

DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=8,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_num_groups=32,
)

_HERE = Path(__file__).parent


def reference_model_dir() -> Path:
    """Directory of the shipped DiT (diffusers format: config.json + safetensors)."""
    return _HERE / "digits_dit"


def classifier_path() -> Path:
    return _HERE / "digits_classifier.safetensors"


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_images, train_labels, held_out_images, held_out_labels)``; images [n, 1, 32, 32] in [-1, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    held = []
    per_class = HELD_OUT // NUM_CLASSES
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    held_idx = torch.cat(held)
    held_idx = held_idx[torch.randperm(len(held_idx), generator=g)]
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return images[mask], labels[mask], images[held_idx], labels[held_idx]


class DigitsClassifier(nn.Module):
    """A small CNN on 32x32 digits; ``features`` (128-d) is the space Fréchet distances are measured in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_reference_model(path: str | Path | None = None):
    """The shipped DiT, loaded with diffusers' ``from_pretrained`` from the package directory."""
    return load_dit(path or reference_model_dir(), "tcpass.zoo.train_digits")


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    return load_weights(DigitsClassifier(), path or classifier_path())
