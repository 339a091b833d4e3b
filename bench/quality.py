"""Quality vs speed on the shipped reference model, over several seeds, against honest baselines.

    python bench/quality.py                          # 5 seeds x 40 samples, default plan
    python bench/quality.py --seeds 3 --plan a.json --plan b.json

Variants, all from the same noise per seed and 50-step DDIM with CFG unless stated:
- ``full``: the uncached model (the reference for PSNR/SSIM);
- each plan (default: the reference model's shipped plan);
- ``<plan> random tokens``: the same plan with seeded random token selection;
- ``fewer steps``: the uncached model with as many DDIM steps as fit in the first plan's measured
  time (round(50 / measured speedup)).
Fidelity (PSNR/SSIM vs full) and class accuracy are per seed (mean ± std over seeds); the Fréchet
distance pools all seeds' samples against 200 held-out real digits, next to the distance between
two disjoint halves of real held-out digits. Writes bench/results/quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpass  # noqa: E402
from bench.common import RESULTS, machine, write_json  # noqa: E402
from tcpass.metrics import class_accuracy, classifier_features, frechet_distance, psnr, ssim  # noqa: E402
from tcpass.sampling import ddim_sample  # noqa: E402
from tcpass.zoo.demo import DEFAULT_PLAN_PATH  # noqa: E402
from tcpass.zoo.digits import NULL_LABEL, NUM_CLASSES, digits_split, load_classifier, load_reference_model  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out.clamp(-1, 1), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, action="append", help="plan JSON (repeatable; default: shipped plan)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=4, help="samples per class per seed")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_reference_model()
    classifier = load_classifier()
    _, _, held_out, _ = digits_split()
    real_a, real_b = held_out[:200], held_out[200:]
    real_features = classifier_features(real_a, classifier)
    real_vs_real = frechet_distance(classifier_features(real_b, classifier), real_features)

    plan_paths = args.plan or [DEFAULT_PLAN_PATH]
    plans = {}
    for path in plan_paths:
        plan = tcpass.load_plan(path)
        plans[path.stem] = plan
        plans[f"{path.stem} random tokens"] = dataclasses.replace(plan, selector=tcpass.SelectorSpec(kind="random"))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    batch = 2 * len(labels)
    example = {
        "hidden_states": torch.zeros(batch, 1, 32, 32),
        "timestep": torch.zeros(batch, dtype=torch.long),
        "class_labels": torch.zeros(batch, dtype=torch.long),
    }
    models = {name: tcpass.transform(model, plan, example_inputs=example) for name, plan in plans.items()}

    def generate(m, noise, steps):
        return ddim_sample(m, noise, labels, NULL_LABEL, steps, args.guidance)

    # Calibrate the equal-time fewer-steps baseline on the first plan (one warm-up, two timed rounds).
    first = next(iter(models.values()))
    probe = torch.randn(len(labels), 1, 32, 32, generator=torch.Generator().manual_seed(10_000))
    ratios = []
    for i in range(3):
        _, t_full = timed(lambda: generate(model, probe, args.steps))
        _, t_plan = timed(lambda: generate(first, probe, args.steps))
        if i:
            ratios.append(t_full / t_plan)
    fewer_steps = max(1, round(args.steps / statistics.median(ratios)))
    variants = {
        "full": (model, args.steps),
        **{n: (m, args.steps) for n, m in models.items()},
        f"fewer steps ({fewer_steps})": (model, fewer_steps),
    }
    print(f"equal-time baseline: {fewer_steps} DDIM steps (first plan measured {statistics.median(ratios):.2f}x)")

    per_seed: dict[str, dict[str, list[float]]] = {n: {"psnr": [], "ssim": [], "acc": [], "s": []} for n in variants}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in variants}
    for seed in range(args.seeds):
        noise = torch.randn(len(labels), 1, 32, 32, generator=torch.Generator().manual_seed(seed))
        images = {}
        for name, (m, steps) in variants.items():
            images[name], seconds = timed(lambda m=m, steps=steps, noise=noise: generate(m, noise, steps))
            per_seed[name]["s"].append(seconds)
            per_seed[name]["acc"].append(class_accuracy(images[name], labels, classifier))
            samples[name].append(images[name])
        for name in variants:
            per_seed[name]["psnr"].append(float(np.mean(psnr(images[name], images["full"]))))
            per_seed[name]["ssim"].append(float(np.mean(ssim(images[name], images["full"]))))
        print(f"seed {seed}: " + ", ".join(f"{n} {per_seed[n]['s'][-1]:.1f}s" for n in variants), flush=True)

    rows = []
    for name in variants:
        d = per_seed[name]
        speedups = [f / s for f, s in zip(per_seed["full"]["s"], d["s"], strict=True)]
        feats = classifier_features(torch.cat(samples[name]), classifier)
        rows.append(
            {
                "variant": name,
                "steps": variants[name][1],
                "speedup_median": statistics.median(speedups),
                "speedup_min_max": [min(speedups), max(speedups)],
                "psnr_db_mean": float(np.mean(d["psnr"])),
                "psnr_db_std": float(np.std(d["psnr"])),
                "ssim_mean": float(np.mean(d["ssim"])),
                "ssim_std": float(np.std(d["ssim"])),
                "class_acc_mean": float(np.mean(d["acc"])),
                "class_acc_std": float(np.std(d["acc"])),
                "frechet_vs_heldout": frechet_distance(feats, real_features),
                "seconds_per_generation": d["s"],
            }
        )
    print(
        f"\n{len(labels)} samples x {args.seeds} seeds per variant; Fréchet distance real-vs-real: {real_vs_real:.2f}"
    )
    print(f"{'variant':28} {'speedup':>8} {'PSNR dB':>14} {'SSIM':>15} {'class acc':>14} {'Fréchet':>8}")
    for r in rows:
        psnr_text = "inf" if np.isinf(r["psnr_db_mean"]) else f"{r['psnr_db_mean']:6.2f} ± {r['psnr_db_std']:4.2f}"
        print(
            f"{r['variant']:28} {r['speedup_median']:7.2f}x {psnr_text:>14} "
            f"{r['ssim_mean']:7.4f} ± {r['ssim_std']:.4f} {r['class_acc_mean']:7.1%} ± {r['class_acc_std']:4.1%} "
            f"{r['frechet_vs_heldout']:8.2f}"
        )
    payload = {
        "machine": machine(),
        "config": {
            "seeds": args.seeds,
            "samples_per_seed": len(labels),
            "steps": args.steps,
            "guidance": args.guidance,
            "plans": {n: p.to_dict() for n, p in plans.items()},
        },
        "frechet_real_vs_real": real_vs_real,
        "results": rows,
    }
    print(f"wrote {write_json(args.out + '.json', payload)}")
    print(f"wrote {plot(rows, RESULTS / (args.out + '.png'), real_vs_real)}")


def plot(rows: list[dict], path: Path, real_vs_real: float) -> Path:
    """Left: PSNR vs full compute; right: Fréchet distance to held-out real digits; both vs speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    full = next(r for r in rows if r["variant"] == "full")
    for r in rows:
        label = f"{r['variant']} (class acc {r['class_acc_mean']:.0%})"
        if r["variant"] != "full":
            ax1.errorbar(r["speedup_median"], r["psnr_db_mean"], yerr=r["psnr_db_std"], fmt="o", capsize=3, label=label)
        ax2.plot(r["speedup_median"], r["frechet_vs_heldout"], "o", label=label)
    ax2.axhline(full["frechet_vs_heldout"], color="gray", ls="--", label="full compute")
    ax2.axhline(real_vs_real, color="black", ls=":", label="real vs real (scale)")
    ax1.set(
        xlabel="measured speedup vs full compute (x)",
        ylabel="PSNR vs full compute (dB)",
        title="fidelity vs speed (mean ± std over seeds)",
    )
    ax2.set(
        xlabel="measured speedup vs full compute (x)",
        ylabel="Fréchet distance to held-out real",
        title="distribution vs speed (lower is better)",
    )
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
