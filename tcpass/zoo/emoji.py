"""Data, evaluator and loaders for the emoji reference model (Noto Color Emoji, 9 categories, 32x32 RGB).

The images are Google's Noto Color Emoji as packaged by the npm package ``emoji-datasource-google``
16.0.0 (``img/google/64/``, 64x64 RGBA PNGs; ``emoji.json`` gives each emoji's Unicode category).
Every image, skin-tone variants included, is composited on white and downscaled to 32x32 RGB
(Pillow, Lanczos), so a patch-2 DiT sees 256 tokens per image. Classes are the 9 Unicode categories
("Component", five skin-tone swatches, is dropped).

The held-out split (about 10% of each class, seeded) is drawn by *emoji*, not by image: the skin-tone
variants of a held-out emoji are all held out, so no near-duplicate of a held-out image is trained on.
The held-out images ship in the package (``emoji_held_out.safetensors``), so evaluation needs no npm.

Licenses: the images are Apache-2.0 (Google Noto Emoji); the npm package is MIT. See ``EMOJI_NOTICE``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import torch
from torch import nn

from tcpass.zoo.loading import load_dit, load_weights

IMAGE_SIZE = 32
PACKAGE = "emoji-datasource-google"
PACKAGE_VERSION = "16.0.0"
CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
CLASS_NAMES = ("smileys", "people", "animals", "food", "travel", "activities", "objects", "symbols", "flags")
NUM_CLASSES = len(CATEGORIES)
NULL_LABEL = NUM_CLASSES  # the class-embedding row classifier-free guidance uses for "no class"
# model timesteps [lo, hi) the sampler guides at (`tcpass.sampling.guided_sample`); CFG at every step collapses
# symbols and flags onto one colour each (bench/results/emoji_guidance_interval.json)
GUIDANCE_INTERVAL = (100.0, 700.0)
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 0

DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=3,
    out_channels=3,
    num_layers=8,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_num_groups=32,
)

_HERE = Path(__file__).parent


def reference_model_dir() -> Path:
    """Directory of the shipped emoji DiT (diffusers format: config.json + safetensors)."""
    return _HERE / "emoji_dit"


def classifier_path() -> Path:
    return _HERE / "emoji_classifier.safetensors"


def held_out_path() -> Path:
    return _HERE / "emoji_held_out.safetensors"


def data_dir() -> Path:
    """Where the npm tarball and the decoded images are cached: ``$TCPASS_DATA_DIR`` or ``~/.cache/tcpass/emoji``."""
    return Path(os.environ.get("TCPASS_DATA_DIR") or Path.home() / ".cache" / "tcpass" / "emoji")


def tarball(directory: Path | None = None) -> Path:
    """The ``emoji-datasource-google`` tarball in ``directory``, downloaded with ``npm pack`` when absent."""
    directory = directory or data_dir()
    path = directory / f"{PACKAGE}-{PACKAGE_VERSION}.tgz"
    if path.is_file():
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"the emoji data need the npm package {PACKAGE}@{PACKAGE_VERSION} and `npm` is not on PATH; install npm "
            f"(e.g. `apt-get install npm`) or put the output of `npm pack {PACKAGE}@{PACKAGE_VERSION}` in {directory} "
            "(or set TCPASS_DATA_DIR to where it is)."
        )
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "pack", f"{PACKAGE}@{PACKAGE_VERSION}"], cwd=directory, check=True, capture_output=True)
    if not path.is_file():
        raise RuntimeError(f"`npm pack {PACKAGE}@{PACKAGE_VERSION}` ran in {directory} but {path.name} is not there.")
    return path


def _to_rgb32(png: bytes):
    """RGBA PNG bytes -> 32x32 RGB uint8 array, composited on white, antialiased downscale."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, image).convert("RGB")
    return np.asarray(rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))


def build_dataset(directory: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images uint8 [n, 3, 32, 32], labels int64 [n], emoji_ids int64 [n])`` from the npm package.

    ``emoji_ids`` numbers the base emoji: skin-tone variants share their base emoji's id. The decoded
    tensors are cached next to the tarball (``emoji32.safetensors``).
    """
    import numpy as np
    from safetensors.torch import load_file, save_file

    directory = directory or data_dir()
    cache = directory / "emoji32.safetensors"
    if cache.is_file():
        d = load_file(str(cache))
        return d["images"], d["labels"], d["emoji_ids"]
    # One sequential pass over the gzip stream reads only emoji.json and the 64 px PNGs (random access
    # into a .tgz would decompress from the start for every member).
    prefix = "package/img/google/64/"
    pngs: dict[str, bytes] = {}
    with tarfile.open(tarball(directory), mode="r|gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json" or member.name.startswith(prefix):
                pngs[member.name.removeprefix(prefix)] = tar.extractfile(member).read()
    entries = json.loads(pngs.pop("package/emoji.json"))
    entries = sorted((e for e in entries if e["category"] in CATEGORIES), key=lambda e: e["sort_order"])
    images, labels, emoji_ids = [], [], []
    for emoji_id, entry in enumerate(entries):
        files = [entry["image"]] + [v["image"] for v in (entry.get("skin_variations") or {}).values()]
        for name in files:
            images.append(_to_rgb32(pngs[name]))
            labels.append(CATEGORIES.index(entry["category"]))
            emoji_ids.append(emoji_id)
    out = (
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(emoji_ids, dtype=torch.long),
    )
    save_file(dict(zip(("images", "labels", "emoji_ids"), out, strict=True)), str(cache))
    return out


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def emoji_split(directory: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_images, train_labels, held_out_images, held_out_labels)``; images [n, 3, 32, 32] in [-1, 1].

    Per class, base emoji are drawn in a seeded random order (with all their skin-tone variants) until
    at least ``HELD_OUT_FRACTION`` of the class's images are held out.
    """
    images, labels, emoji_ids = build_dataset(directory)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        in_class = labels == c
        ids = emoji_ids[in_class].unique()
        target = HELD_OUT_FRACTION * int(in_class.sum())
        for emoji_id in ids[torch.randperm(len(ids), generator=g)].tolist():
            if held[in_class].sum() >= target:
                break
            held |= emoji_ids == emoji_id
    x = to_float(images)
    return x[~held], labels[~held], x[held], labels[held]


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped held-out real images (never trained on): ``(images [n, 3, 32, 32] in [-1, 1], labels [n])``."""
    from safetensors.torch import load_file

    d = load_file(str(held_out_path()))
    return to_float(d["images"]), d["labels"]


class EmojiClassifier(nn.Module):
    """A small CNN on 32x32 RGB emoji; ``features`` (128-d) is the space Fréchet distances are measured in."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.conv = nn.Sequential(
            *block(3, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),
            *block(64, 128),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(128 * 4 * 4, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_reference_model(path: str | Path | None = None):
    """The shipped emoji DiT, loaded with diffusers' ``from_pretrained`` from the package directory."""
    return load_dit(path or reference_model_dir(), "tcpass.zoo.train_emoji")


def load_classifier(path: str | Path | None = None) -> EmojiClassifier:
    return load_weights(EmojiClassifier(), path or classifier_path())
