"""Quality vs speed on a shipped reference model: TokenCache selectors against the baselines.

    python bench/quality.py --plan bench/plans/digits_2x.json --plan bench/plans/digits_3x.json
    python bench/quality.py --seeds 3                     # the shipped plan only
    python bench/quality.py --model emoji --seeds 3       # the emoji model and its shipped plan

For every plan given (normally `tcpass calibrate` outputs at about 2x and 3x), variants with the
same blocks, keep ratios and TPRR schedule and a different token selector, plus the baselines at
the plan's predicted speed:

- ``dynamic predictor`` / ``static predictor``: the learned Cache Predictors (the static table is
  trained here on the model's own calibration samples, seed 1234, disjoint from the test noise);
- ``input_change``: training-free, in-graph (most-changed block inputs);
- ``random tokens``: seeded random selection;
- ``ToCa-style``: attention received at the last FULL step, recomputed tokens deprioritised;
- ``FORA-style``: whole-block reuse (keep 0) every cached step, interval set by measured step times
  to the plan's predicted speedup;
- ``fewer steps``: the uncached model with round(50 / predicted speedup) DDIM steps.

All variants run from the same noise per seed (50-step DDIM, CFG 4; emoji: at t in [100, 700)); speedups
are measured on these very generations (median over seeds of full time / variant time, one process, variants in turn).
Fidelity (PSNR/SSIM vs full) and class accuracy are per seed (mean ± std over seeds); the Fréchet
distance pools all seeds' samples against one half of the model's held-out real images, next to the
distance between the two disjoint halves. Writes bench/results/<out>.json and <out>.png
(``--out`` defaults to ``quality`` for digits, ``quality_<model>`` otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpass  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS,
    add_allocator_option,
    add_guidance_options,
    apply_allocator_option,
    fidelity_row,
    guidance_interval_of,
    machine,
    write_json,
)
from tcpass import calibrate as cal  # noqa: E402
from tcpass.files import sha256_of  # noqa: E402
from tcpass.metrics import class_accuracy, classifier_features, frechet_distance, psnr, ssim  # noqa: E402
from tcpass.sampling import ddim_sample, ddim_timesteps  # noqa: E402
from tcpass.selectors import StaticScoreSelector  # noqa: E402
from tcpass.zoo import REFERENCE_MODELS, reference  # noqa: E402

PLANS_DIR = Path(__file__).parent / "plans"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out.clamp(-1, 1), time.perf_counter() - start


def static_selector(model, model_name: str) -> tcpass.SelectorSpec:
    """Train the static Cache Predictor on the model's own calibration samples (cached on disk)."""
    path = PLANS_DIR / f"{model_name}_static_scores.safetensors"
    if not path.is_file():
        data = cal.collect(model, num_samples=20)
        trained = cal.train_predictor(model, data, "static", iterations=120)
        grid = torch.arange(0, 1000, 10, dtype=torch.float32)
        blocks = torch.arange(len(model.transformer_blocks))
        StaticScoreSelector(trained.predictor.table(grid), grid, blocks).save(path)
    return tcpass.SelectorSpec(kind="static", path=str(path), sha256=sha256_of(path))


def variants_for(model, name: str, plan: tcpass.CachePlan, batch: int, static: tcpass.SelectorSpec, steps: int):
    """(variant name -> (plan or None for the plain model, sampler steps)) around one plan."""
    ratios = tuple(sorted({0.0, *plan.keep_ratio}))
    times = cal.measure_step_times(model, ratios, dataclasses.replace(plan, selector=tcpass.SelectorSpec()), batch)
    ts = ddim_timesteps(steps)
    target = times.speedup(plan, ts)
    fora = min(
        (
            dataclasses.replace(
                plan,
                blocks="all",
                keep_ratio=0.0,
                block_keep_ratio={},
                selector=tcpass.SelectorSpec(),
                schedule=tcpass.TPRRSchedule(boundary_timestep=500, intervals=(i, i)),
            )
            for i in range(2, 40)
        ),
        key=lambda p: abs(times.speedup(p, ts) - target),
    )
    sel = tcpass.SelectorSpec
    return target, {
        f"{name} as shipped ({plan.selector.kind})": (plan, steps),
        f"{name} static predictor": (dataclasses.replace(plan, selector=static), steps),
        f"{name} input_change": (dataclasses.replace(plan, selector=sel(kind="input_change")), steps),
        f"{name} random tokens": (dataclasses.replace(plan, selector=sel(kind="random")), steps),
        f"{name} ToCa-style": (dataclasses.replace(plan, selector=sel(kind="toca")), steps),
        f"{name} FORA-style (every {fora.schedule.intervals[0]})": (fora, steps),
        f"{name} fewer steps ({max(1, round(steps / target))})": (None, max(1, round(steps / target))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCE_MODELS), default="digits", help="reference model")
    parser.add_argument("--plan", type=Path, action="append", help="plan JSON (repeatable; default: shipped plan)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=2, help="samples per class per seed")
    parser.add_argument("--steps", type=int, default=50)
    add_guidance_options(parser)
    parser.add_argument("--threads", type=int, default=2)
    add_allocator_option(parser)
    parser.add_argument("--out", default=None, help="result file stem (default: quality or quality_<model>)")
    args = parser.parse_args()
    args.out = args.out or ("quality" if args.model == "digits" else f"quality_{args.model}")
    apply_allocator_option(args)
    torch.set_num_threads(args.threads)

    ref = reference(args.model)
    interval = guidance_interval_of(args, ref)
    model = ref.load_model(None)
    classifier = ref.load_classifier()
    held_out, _ = ref.held_out()
    real_a, real_b = held_out[: len(held_out) // 2], held_out[len(held_out) // 2 :]
    real_features = classifier_features(real_a, classifier)
    real_vs_real = frechet_distance(classifier_features(real_b, classifier), real_features)

    labels = torch.arange(ref.num_classes).repeat_interleave(args.per_class)
    batch = 2 * len(labels)
    example = {
        "hidden_states": torch.zeros(batch, *ref.image_shape),
        "timestep": torch.zeros(batch, dtype=torch.long),
        "class_labels": torch.zeros(batch, dtype=torch.long),
    }
    static = static_selector(model, ref.name)
    variants: dict[str, tuple] = {"full": (model, args.steps)}
    plans: dict[str, tcpass.CachePlan] = {}
    targets = {}
    for path in args.plan or [ref.default_plan]:
        plan = tcpass.load_plan(path)
        target, group = variants_for(model, path.stem, plan, batch, static, args.steps)
        targets[path.stem] = target
        for name, (p, steps) in group.items():
            plans[name] = p
            variants[name] = (model if p is None else tcpass.transform(model, p, example_inputs=example), steps)
    print("predicted speedups: " + ", ".join(f"{k} {v:.2f}x" for k, v in targets.items()), flush=True)

    def generate(m, noise, steps):
        return ddim_sample(m, noise, labels, ref.null_label, steps, args.guidance, guidance_interval=interval)

    warm = torch.randn(len(labels), *ref.image_shape, generator=torch.Generator().manual_seed(10_000))
    for m, steps in variants.values():
        generate(m, warm, steps)

    per_seed: dict[str, dict[str, list[float]]] = {n: {"psnr": [], "ssim": [], "acc": [], "s": []} for n in variants}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in variants}
    for seed in range(args.seeds):
        noise = torch.randn(len(labels), *ref.image_shape, generator=torch.Generator().manual_seed(seed))
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
                **fidelity_row(speedups, d, frechet_distance(feats, real_features)),
                "seconds_per_generation": d["s"],
            }
        )
    print(
        f"\n{len(labels)} samples x {args.seeds} seeds per variant (model batch {batch}); "
        f"Fréchet distance real-vs-real: {real_vs_real:.2f}"
    )
    print(f"{'variant':40} {'speedup':>8} {'PSNR dB':>14} {'SSIM':>15} {'class acc':>14} {'Fréchet':>8}")
    for r in rows:
        psnr_text = "inf" if np.isinf(r["psnr_db_mean"]) else f"{r['psnr_db_mean']:6.2f} ± {r['psnr_db_std']:4.2f}"
        print(
            f"{r['variant']:40} {r['speedup_median']:7.2f}x {psnr_text:>14} "
            f"{r['ssim_mean']:7.4f} ± {r['ssim_std']:.4f} {r['class_acc_mean']:7.1%} ± {r['class_acc_std']:4.1%} "
            f"{r['frechet_vs_heldout']:8.2f}"
        )
    payload = {
        "machine": machine(),
        "config": {
            "model": args.model,
            "seeds": args.seeds,
            "samples_per_seed": len(labels),
            "batch": batch,
            "steps": args.steps,
            "guidance": args.guidance,
            "guidance_interval": interval,
            "predicted_speedups": targets,
            "plans": {n: (p.to_dict() if p is not None else None) for n, p in plans.items()},
        },
        "frechet_real_vs_real": real_vs_real,
        "results": rows,
    }
    print(f"wrote {write_json(args.out + '.json', payload)}")
    print(f"wrote {plot(rows, RESULTS / (args.out + '.png'), real_vs_real, args.model)}")


def plot(rows: list[dict], path: Path, real_vs_real: float, model_name: str) -> Path:
    """Left: PSNR vs full compute; right: Fréchet distance to held-out real; both vs measured speedup.

    Colour = method (selector or baseline), marker = the plan it is matched to.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def split(variant: str) -> tuple[str, str]:
        plan, _, method = variant.partition(" ")
        return (plan, method.split(" (")[0]) if method else ("", variant)

    methods = sorted({split(r["variant"])[1] for r in rows if r["variant"] != "full"})
    plans = sorted({split(r["variant"])[0] for r in rows if r["variant"] != "full"})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    markers = {p: "osD^v"[i % 5] for i, p in enumerate(plans)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    full = next(r for r in rows if r["variant"] == "full")
    for r in rows:
        if r["variant"] == "full":
            continue
        plan, method = split(r["variant"])
        style = dict(color=colors[method], marker=markers[plan], linestyle="none")
        ax1.errorbar(r["speedup_median"], r["psnr_db_mean"], yerr=r["psnr_db_std"], capsize=3, **style)
        ax2.plot(r["speedup_median"], r["frechet_vs_heldout"], **style)
    ax2.axhline(full["frechet_vs_heldout"], color="gray", ls="--")
    ax2.axhline(real_vs_real, color="black", ls=":")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="none", label=m) for m, c in colors.items()]
    handles += [
        plt.Line2D([], [], color="k", marker=mk, ls="none", label=f"matched to {p}") for p, mk in markers.items()
    ]
    handles += [
        plt.Line2D([], [], color="gray", ls="--", label="full compute (Fréchet)"),
        plt.Line2D([], [], color="black", ls=":", label="real vs real (Fréchet scale)"),
    ]
    ax1.set(
        xlabel="measured speedup vs full compute (x)",
        ylabel="PSNR vs full compute (dB)",
        title="fidelity vs speed (mean ± std over seeds; higher is better)",
    )
    ax2.set(
        xlabel="measured speedup vs full compute (x)",
        ylabel="Fréchet distance to held-out real",
        title=f"distribution vs speed (lower is closer to real {model_name})",
    )
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
