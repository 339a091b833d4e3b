"""What pruned tokens should get: each token plan with its residuals reused vs forecast from each token's history.

    python bench/token_forecast.py --plan bench/plans/digits_2x.json --plan bench/plans/digits_3x.json --intervals 2,4
    python bench/token_forecast.py --model emoji --plan bench/plans/emoji_phase4_2x.json --seeds 3

For every plan given: the plan as shipped (pruned tokens reuse their cached residual), the same plan with
every forecaster of ``--forecast`` (``anchored:1``: `tcpass.forecasters.anchored`; ``taylor:1``:
`tcpass.forecasters.taylor`), the same with ``--intervals`` in place of the plan's TPRR intervals, and the
uncached model with round(steps / speedup) DDIM steps at the shipped plan's measured speedup. Nothing is
re-calibrated: the plans' blocks, keep ratios, schedules and selectors are kept, so the rows show what
the forecast alone changes. All variants run from the same noise per seed (50-step DDIM, CFG 4; emoji:
at t in [100, 700)), in turn within each seed; speedup = median over seeds of full time / variant time.
Fidelity (PSNR/SSIM vs full) and class accuracy are per seed (mean ± std); the Fréchet distance pools
all seeds' samples against the model's held-out real images. Writes bench/results/<out>.json.
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
    add_guidance_options,
    fidelity_row,
    guidance_interval_of,
    machine,
    write_json,
)
from tcpass.metrics import class_accuracy, classifier_features, frechet_distance, psnr, ssim  # noqa: E402
from tcpass.plan import parse_forecast  # noqa: E402
from tcpass.sampling import ddim_sample  # noqa: E402
from tcpass.zoo import REFERENCE_MODELS, reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCE_MODELS), default="digits", help="reference model")
    parser.add_argument("--plan", type=Path, action="append", required=True, help="plan JSON (repeatable)")
    parser.add_argument(
        "--forecast",
        default="anchored:1,anchored:2,taylor:1",
        help="comma list of kind:order besides reuse, each optionally +W for cluster propagation of weight W "
        "(taylor:1+0.5, reuse+1: `tcpass.forecasters.propagation`)",
    )
    parser.add_argument(
        "--intervals",
        action="append",
        default=[],
        help="also run each plan with its TPRR intervals replaced, e.g. 2,4 (repeatable; a diagnostic: the "
        "plan is then no longer as calibrated, and its measured speed changes)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=2, help="samples per class per seed")
    parser.add_argument("--steps", type=int, default=50)
    add_guidance_options(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="result file stem (default: token_forecast_<model>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ref = reference(args.model)
    interval = guidance_interval_of(args, ref)
    model = ref.load_model(None)
    classifier = ref.load_classifier()
    held_out, _ = ref.held_out()
    real_features = classifier_features(held_out[: len(held_out) // 2], classifier)
    labels = torch.arange(ref.num_classes).repeat_interleave(args.per_class)
    forecasts = ["reuse", *[f for f in args.forecast.split(",") if f]]

    variants: dict[str, tuple[torch.nn.Module, int, dict | None]] = {"full": (model, args.steps, None)}
    for path in args.plan:
        shipped = tcpass.load_plan(path)
        if shipped.blocks == ():  # a step-only plan: no pruned token, every forecast row would equal reuse
            parser.error(f"{path} caches no block (blocks = []): there are no pruned tokens to forecast.")
        for intervals in [None, *args.intervals]:
            plan, label = shipped, path.stem
            if intervals is not None:
                pair = tuple(int(i) for i in intervals.split(","))
                plan = dataclasses.replace(shipped, schedule=dataclasses.replace(shipped.schedule, intervals=pair))
                label = f"{path.stem} intervals {pair}"
            for text in forecasts:
                p = dataclasses.replace(plan, forecast=parse_forecast(text))
                steps = plan.sampler_steps or args.steps
                variants[f"{label} {text}"] = (tcpass.transform(model, p), steps, p.to_dict())

    def generate(m, noise, steps):
        with torch.no_grad():
            out = ddim_sample(m, noise, labels, ref.null_label, steps, args.guidance, guidance_interval=interval)
        return out.clamp(-1, 1)

    warm = torch.randn(len(labels), *ref.image_shape, generator=torch.Generator().manual_seed(10_000))
    for m, steps, _ in variants.values():
        generate(m, warm, steps)
    # the uncached model at the shipped plans' measured speed: fewer DDIM steps
    seconds = {n: [] for n in variants}
    for name, (m, steps, _) in variants.items():
        start = time.perf_counter()
        generate(m, warm, steps)
        seconds[name].append(time.perf_counter() - start)
    for path in args.plan:
        speed = seconds["full"][0] / seconds[f"{path.stem} reuse"][0]
        n = max(1, round(args.steps / speed))
        variants[f"{path.stem}: {n} DDIM steps"] = (model, n, None)

    per_seed = {n: {"psnr": [], "ssim": [], "acc": [], "s": []} for n in variants}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in variants}
    for seed in range(args.seeds):
        noise = torch.randn(len(labels), *ref.image_shape, generator=torch.Generator().manual_seed(seed))
        images = {}
        for name, (m, steps, _) in variants.items():
            start = time.perf_counter()
            images[name] = generate(m, noise, steps)
            per_seed[name]["s"].append(time.perf_counter() - start)
            per_seed[name]["acc"].append(class_accuracy(images[name], labels, classifier))
            samples[name].append(images[name])
        for name in variants:
            per_seed[name]["psnr"].append(float(np.mean(psnr(images[name], images["full"]))))
            per_seed[name]["ssim"].append(float(np.mean(ssim(images[name], images["full"]))))
        print(f"seed {seed}: " + ", ".join(f"{n} {per_seed[n]['psnr'][-1]:.2f} dB" for n in variants), flush=True)

    rows = []
    for name, (_, steps, plan) in variants.items():
        d = per_seed[name]
        speedups = [f / s for f, s in zip(per_seed["full"]["s"], d["s"], strict=True)]
        feats = classifier_features(torch.cat(samples[name]), classifier)
        rows.append(
            {
                "variant": name,
                "steps": steps,
                "plan": plan,
                **fidelity_row(speedups, d, frechet_distance(feats, real_features)),
            }
        )
    print(f"\n{len(labels)} samples x {args.seeds} seeds per variant")
    print(f"{'variant':36} {'speedup':>8} {'PSNR dB':>14} {'SSIM':>8} {'class acc':>9} {'Fréchet':>8}")
    for r in rows:
        psnr_text = "inf" if np.isinf(r["psnr_db_mean"]) else f"{r['psnr_db_mean']:6.2f} ± {r['psnr_db_std']:4.2f}"
        print(
            f"{r['variant']:36} {r['speedup_median']:7.2f}x {psnr_text:>14} {r['ssim_mean']:8.4f} "
            f"{r['class_acc_mean']:9.1%} {r['frechet_vs_heldout']:8.2f}"
        )
    payload = {
        "machine": machine(),
        "config": {
            "model": args.model,
            "seeds": args.seeds,
            "samples_per_seed": len(labels),
            "steps": args.steps,
            "guidance": args.guidance,
            "guidance_interval": interval,
        },
        "results": rows,
    }
    print(f"wrote {write_json((args.out or f'token_forecast_{args.model}') + '.json', payload)}")


if __name__ == "__main__":
    main()
