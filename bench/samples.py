"""Sample quality of a reference model at full compute: class accuracy and Fréchet distance.

    python bench/samples.py --model emoji          # 50-step DDIM, CFG 4 (emoji: at t in [100, 700), the model's own)

The held-out real images are split per class into two halves A and B (alternating within each
class). The model generates one sample for every image of B, with B's label (so both sides have
the same class mix); then:

- class accuracy: the independent classifier's argmax equals the intended label (overall, and the
  mean over classes, since the held-out mix is uneven);
- Fréchet distance in the classifier's feature space, generated vs A, next to real B vs A for scale
  (same sizes on both sides, so the two numbers are comparable).

Writes bench/results/<model>_samples.json and <model>_samples.png (per class: generated samples,
then real held-out images after the gap).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, add_guidance_options, guidance_interval_of, machine, write_json  # noqa: E402
from tcpass.metrics import classifier_features, frechet_distance  # noqa: E402
from tcpass.sampling import ddim_sample, describe_guidance  # noqa: E402
from tcpass.zoo import REFERENCE_MODELS, ReferenceModel, reference  # noqa: E402


def halves(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of two halves of ``labels``, alternating within each class (A gets the extra one)."""
    a, b = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        a.append(idx[0::2])
        b.append(idx[1::2])
    return torch.cat(a), torch.cat(b)


def save_sample_grid(
    ref: ReferenceModel,
    samples: torch.Tensor,
    labels: torch.Tensor,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    path: Path,
    title: str,
    per_row: int = 8,
    real_per_row: int = 3,
) -> Path:
    """One row per class: up to ``per_row`` generated samples, a gap, ``real_per_row`` held-out real images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = per_row + 1 + real_per_row
    fig, axes = plt.subplots(ref.num_classes, cols, figsize=(0.7 * cols + 0.4, 0.7 * ref.num_classes + 0.5))
    for c, name in enumerate(ref.class_names):
        generated, held = samples[labels == c][:per_row], real[real_labels == c][:real_per_row]
        for j in range(cols):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off" if j == per_row else "on")
            image = generated[j] if j < len(generated) else held[j - per_row - 1] if j > per_row else None
            if image is not None and (j < per_row or j - per_row - 1 < len(held)):
                shown = ((image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
                ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0, vmax=1)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    axes[0, 0].set_title(title, fontsize=8, loc="left")
    axes[0, per_row + 1].set_title("held-out real", fontsize=8, loc="left")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=0.95, wspace=0.08, hspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCE_MODELS), default="emoji")
    parser.add_argument("--model-dir", type=Path, default=None, help="DiT directory (default: the shipped weights)")
    parser.add_argument("--steps", type=int, default=50)
    add_guidance_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="samples per sampler call")
    parser.add_argument("--max-samples", type=int, default=None, help="use every k-th image of half B (time)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="result file stem (default: <model>_samples)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = reference(args.model)
    interval = guidance_interval_of(args, ref)
    model = ref.load_model(args.model_dir)
    classifier = ref.load_classifier()
    real, real_labels = ref.held_out()
    a, b = halves(real_labels)
    if args.max_samples and len(b) > args.max_samples:
        b = b[:: -(-len(b) // args.max_samples)]  # every k-th keeps B's class mix
    labels = real_labels[b]

    start = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(labels), *ref.image_shape, generator=g)
    chunks = []
    for i in range(0, len(labels), args.batch):
        chunks.append(
            ddim_sample(
                model,
                noise[i : i + args.batch],
                labels[i : i + args.batch],
                ref.null_label,
                args.steps,
                args.guidance,
                guidance_interval=interval,
            ).clamp(-1, 1)
        )
        print(f"{i + len(chunks[-1])}/{len(labels)} samples, {time.perf_counter() - start:.0f} s", flush=True)
    samples = torch.cat(chunks)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        predicted = classifier(samples).argmax(1)
        real_predicted = classifier(real[b]).argmax(1)
    per_class = {name: (predicted[labels == c] == c).float().mean().item() for c, name in enumerate(ref.class_names)}
    real_per_class = {
        name: (real_predicted[labels == c] == c).float().mean().item() for c, name in enumerate(ref.class_names)
    }
    features_a = classifier_features(real[a], classifier)
    result = {
        "machine": machine(),
        "config": {
            "model": args.model,
            "model_dir": str(args.model_dir) if args.model_dir else None,
            "steps": args.steps,
            "guidance": args.guidance,
            "guidance_interval": interval,
            "seed": args.seed,
            "samples": len(labels),
            "real_a": len(a),
            "real_b": len(b),
        },
        "class_accuracy": (predicted == labels).float().mean().item(),
        "class_accuracy_mean_over_classes": sum(per_class.values()) / len(per_class),
        "class_accuracy_per_class": per_class,
        "real_b_class_accuracy": (real_predicted == labels).float().mean().item(),
        "real_b_class_accuracy_per_class": real_per_class,
        "frechet_generated_vs_real_a": frechet_distance(classifier_features(samples, classifier), features_a),
        "frechet_real_b_vs_real_a": frechet_distance(classifier_features(real[b], classifier), features_a),
        "sampling_seconds": seconds,
    }
    print(
        f"\n{args.model}: {len(labels)} samples ({args.steps}-step DDIM, "
        f"{describe_guidance(args.guidance, interval)}) in {seconds:.0f} s"
    )
    print(f"{'':28} {'generated':>10} {'real (B)':>10}")
    print(f"{'class accuracy':28} {result['class_accuracy']:10.1%} {result['real_b_class_accuracy']:10.1%}")
    print(
        f"{'  mean over classes':28} {result['class_accuracy_mean_over_classes']:10.1%} "
        f"{sum(real_per_class.values()) / len(real_per_class):10.1%}"
    )
    for name in ref.class_names:
        print(f"{'  ' + name:28} {per_class[name]:10.1%} {real_per_class[name]:10.1%}")
    print(
        f"{'Fréchet distance to real A':28} {result['frechet_generated_vs_real_a']:10.2f} "
        f"{result['frechet_real_b_vs_real_a']:10.2f}"
    )
    stem = args.out or f"{args.model}_samples"
    print(f"wrote {write_json(stem + '.json', result)}")
    title = f"{args.model} DiT, generated ({args.steps}-step DDIM, {describe_guidance(args.guidance, interval)})"
    grid = save_sample_grid(ref, samples, labels, real[a], real_labels[a], RESULTS / f"{stem}.png", title)
    print(f"wrote {grid}")


if __name__ == "__main__":
    main()
