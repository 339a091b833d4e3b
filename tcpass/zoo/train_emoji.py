"""Train the emoji reference model and its independent evaluator. Seeded and reproducible.

    python -m tcpass.zoo.train_emoji                   # held-out set, classifier, DiT phase 1 (650 steps)
    python -m tcpass.zoo.train_emoji --only dit --init tcpass/zoo/emoji_dit --steps 1500 --seed 1   # phase 2
    python -m tcpass.zoo.train_emoji --only dit --init tcpass/zoo/emoji_dit --steps 1500 --seed 2 --lr 3e-4  # phase 3
    python -m tcpass.zoo.train_emoji --only dit --init tcpass/zoo/emoji_dit --steps 2400 --batch 48 \
        --lr 3e-4 --seed 3 --bf16                                                                   # phase 4
    python -m tcpass.zoo.train_emoji --only classifier
    python -m tcpass.zoo.train_emoji --only dit --steps 15 --out /tmp/emoji_dit   # time a few steps

The shipped weights are phase 1, then phases 2, 3 and 4 (each a new cosine schedule from the previous
phase's EMA weights): phase 1 alone ran while the 2 cores were shared and gave noisy textures
(bench/results/emoji_samples_phase1.png); after phase 2, 67.0% of samples were recognised as their class
(emoji_samples_phase2.png), after phase 3 81.2% (emoji_samples_phase3.png); phase 4 doubles the batch
under bfloat16 autocast (emoji_samples.png).

The DiT (8 blocks, hidden 128, 256 tokens of 2x2 RGB patches) learns epsilon-prediction on the
training split, batches drawn class-balanced (people are 60% of the images), with horizontal flips,
shifts of up to 2 pixels and 10% of labels replaced by the null class (for classifier-free
guidance); the weights saved are an exponential moving average. The loss curve is written to
``--results`` (``emoji_train_loss.png`` and ``.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tcpass.adapters import quiet_load_kwargs
from tcpass.zoo.emoji import (
    DIT_CONFIG,
    NULL_LABEL,
    NUM_CLASSES,
    EmojiClassifier,
    classifier_path,
    emoji_split,
    held_out_path,
    reference_model_dir,
    to_uint8,
)
from tcpass.zoo.training import diffusion_step, noise_schedule, set_cosine_lr

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def augment(images: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Per-sample random horizontal flip and translation by up to ``max_shift`` pixels (padded with white)."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=g) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, [max_shift] * 4, value=1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts)])


def balanced_batch(labels: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
    """``batch`` indices drawn with replacement so that every class is equally likely."""
    weights = 1.0 / torch.bincount(labels).float()[labels]
    return torch.multinomial(weights, batch, replacement=True, generator=g)


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, epochs: int = 20, batch: int = 64, seed: int = 0
) -> EmojiClassifier:
    """Train the evaluator CNN on ``x`` [n, 3, 32, 32] in [-1, 1]: class-balanced batches, flips, shifts, noise."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = EmojiClassifier()
    steps_per_epoch = len(x) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in tqdm(range(epochs), desc="classifier epochs"):
        for _ in range(steps_per_epoch):
            idx = balanced_batch(y, batch, g)
            images = augment(x[idx], g) + 0.05 * torch.randn(batch, 3, 32, 32, generator=g)
            loss = F.cross_entropy(model(images), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_dit(
    x: torch.Tensor,
    y: torch.Tensor,
    config: dict,
    steps: int,
    batch: int = 64,
    lr: float = 3e-4,
    warmup: int = 100,
    seed: int = 0,
    checkpoint: Callable[[DiTTransformer2DModel, list[float]], None] | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    init: Path | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[DiTTransformer2DModel, list[float]]:
    """Train a DiT on ``x`` [n, C, H, W] in [-1, 1] with labels ``y``; returns ``(EMA model, per-step losses)``.

    The null label is ``config["num_embeds_ada_norm"]``. ``checkpoint(ema, losses)`` is called every
    ``checkpoint_every`` steps, so a long run leaves usable weights behind. ``init``: a saved DiT
    (same config) to continue from, with a fresh optimizer, warmup and cosine schedule. ``autocast``:
    mixed precision for the forward pass (`diffusion_step`).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    null_label = config["num_embeds_ada_norm"]
    model = DiTTransformer2DModel(**config)
    if init is not None:
        model.load_state_dict(DiTTransformer2DModel.from_pretrained(init, **quiet_load_kwargs()).state_dict())
    # eval(): diffusers' label embedding would drop labels independently in every block; the null
    # label is applied here instead, once per sample, consistently across blocks.
    model.eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    schedule = noise_schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="DiT training", disable=not progress, mininterval=10)
    for step in bar:
        set_cosine_lr(opt, lr, step, steps, warmup)
        idx = balanced_batch(y, batch, g)
        x0 = augment(x[idx], g)
        losses.append(diffusion_step(model, ema, opt, schedule, x0, y[idx], null_label, step, g, autocast))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            checkpoint(ema, losses)
    return ema, losses


def save_loss_curve(losses: list[float], results: Path, seconds: float) -> Path:
    """``emoji_train_loss.png`` (per-step loss and its 50-step mean) and ``.json`` in ``results``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results.mkdir(parents=True, exist_ok=True)
    smooth = [sum(losses[max(0, i - 49) : i + 1]) / len(losses[max(0, i - 49) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.4, label="per step")
    ax.plot(smooth, lw=1.5, label="mean of 50 steps")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("epsilon MSE")
    ax.set_title(f"emoji DiT training: {len(losses)} steps, {seconds / 60:.0f} min")
    ax.legend()
    fig.tight_layout()
    path = results / "emoji_train_loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    (results / "emoji_train_loss.json").write_text(json.dumps({"seconds": seconds, "losses": losses}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=reference_model_dir(), help="DiT output directory")
    parser.add_argument("--classifier-out", type=Path, default=classifier_path())
    parser.add_argument("--held-out-out", type=Path, default=held_out_path())
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the loss curve goes")
    parser.add_argument("--steps", type=int, default=650, help="DiT optimizer steps")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--init", type=Path, default=None, help="continue from this saved DiT (same config)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for the DiT's forward pass (mixed precision; about 1.4x the samples per second "
        "at batch 48 on a CPU with avx512_bf16)",
    )
    parser.add_argument("--only", choices=["classifier", "dit", "held-out"], default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x, y, x_held, y_held = emoji_split()
    print(f"emoji split: {len(x)} training images, {len(x_held)} held out; per class {torch.bincount(y).tolist()}")
    if args.only in (None, "held-out"):
        save_file({"images": to_uint8(x_held), "labels": y_held}, str(args.held_out_out))
        print(f"held-out set -> {args.held_out_out}")
    if args.only in (None, "classifier"):
        classifier = train_classifier(x, y, seed=args.seed)
        with torch.no_grad():
            predicted = classifier(x_held).argmax(1)
        accuracy = (predicted == y_held).float().mean().item()
        per_class = [(predicted[y_held == c] == c).float().mean().item() for c in range(NUM_CLASSES)]
        save_file(classifier.state_dict(), str(args.classifier_out))
        print(
            f"classifier held-out accuracy: {accuracy:.4f} (class-balanced {sum(per_class) / NUM_CLASSES:.4f}; "
            f"per class {[round(a, 2) for a in per_class]})  -> {args.classifier_out}"
        )
    if args.only in (None, "dit"):
        assert DIT_CONFIG["num_embeds_ada_norm"] == NULL_LABEL

        def checkpoint(ema, losses):
            ema.save_pretrained(args.out, safe_serialization=True)
            save_loss_curve(losses, args.results, time.perf_counter() - dit_start)

        dit_start = time.perf_counter()
        ema, losses = train_dit(
            x,
            y,
            DIT_CONFIG,
            args.steps,
            args.batch,
            args.lr,
            seed=args.seed,
            checkpoint=checkpoint,
            init=args.init,
            autocast=torch.bfloat16 if args.bf16 else None,
        )
        ema.save_pretrained(args.out, safe_serialization=True)
        seconds = time.perf_counter() - dit_start
        curve = save_loss_curve(losses, args.results, seconds)
        print(f"DiT: {seconds:.0f} s, {seconds / len(losses):.2f} s/step; loss curve -> {curve}")
        print(f"DiT final loss (mean of last 100 steps): {sum(losses[-100:]) / len(losses[-100:]):.4f}  -> {args.out}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
