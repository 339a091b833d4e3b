"""Train the reference model and its independent evaluator. Seeded and reproducible.

    python -m tcpass.zoo.train_digits              # both, into the package directory
    python -m tcpass.zoo.train_digits --only classifier

The DiT (8 blocks, hidden 128, 256 tokens) learns epsilon-prediction on the training split with
10% of labels replaced by the null class (for classifier-free guidance); the weights saved are an
exponential moving average. About 45 minutes on 2 CPU cores at the defaults.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tcpass.zoo.digits import (
    DIT_CONFIG,
    NULL_LABEL,
    DigitsClassifier,
    classifier_path,
    digits_split,
    reference_model_dir,
)
from tcpass.zoo.training import diffusion_step, noise_schedule, set_cosine_lr


def _shift(images: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero-padded with the background value -1)."""
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    return padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]


def train_classifier(out: Path, epochs: int = 30, seed: int = 0) -> float:
    """Train the evaluator CNN on the training split; returns its held-out accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y, x_held, y_held = digits_split()
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(epochs), desc="classifier epochs"):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            noisy = _shift(x[idx], g) + 0.05 * torch.randn(len(idx), 1, 32, 32, generator=g)
            loss = F.cross_entropy(model(noisy), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_held).argmax(1) == y_held).float().mean().item()
    save_file(model.state_dict(), str(out))
    return accuracy


def train_dit(out: Path, steps: int = 1800, batch: int = 64, lr: float = 3e-4, seed: int = 0) -> float:
    """Train the DiT; saves the EMA weights with ``save_pretrained``; returns the final mean loss."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y, _, _ = digits_split()
    model = DiTTransformer2DModel(**DIT_CONFIG)
    # eval(): diffusers' label embedding would drop labels independently in every block; the null
    # label is applied here instead, once per sample, consistently across blocks.
    model.eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    schedule = noise_schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 100
    losses = []
    bar = tqdm(range(steps), desc="DiT training")
    for step in bar:
        set_cosine_lr(opt, lr, step, steps, warmup)
        idx = torch.randint(0, len(x), (batch,), generator=g)
        x0 = _shift(x[idx], g, max_shift=1)
        losses.append(diffusion_step(model, ema, opt, schedule, x0, y[idx], NULL_LABEL, step, g))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    ema.save_pretrained(out, safe_serialization=True)
    return sum(losses[-100:]) / len(losses[-100:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=reference_model_dir(), help="DiT output directory")
    parser.add_argument("--classifier-out", type=Path, default=classifier_path())
    parser.add_argument("--steps", type=int, default=1800, help="DiT optimizer steps (batch 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["classifier", "dit"], default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.only in (None, "classifier"):
        accuracy = train_classifier(args.classifier_out, seed=args.seed)
        print(f"classifier held-out accuracy: {accuracy:.4f}  -> {args.classifier_out}")
    if args.only in (None, "dit"):
        loss = train_dit(args.out, steps=args.steps, seed=args.seed)
        print(f"DiT final loss (mean of last 100 steps): {loss:.4f}  -> {args.out}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
