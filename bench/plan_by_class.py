"""Per-class fidelity of plans on calibration samples vs the peers bench's samples (no timing).

    python bench/plan_by_class.py --model emoji --labels random \\
        --plan bench/plans/emoji_phase4_3x.json --baseline-steps 17

Why a plan's calibration score does not hold on the bench: the calibration samples (seed 1234,
``--samples`` of them, labels drawn as ``--labels`` says: ``stratified`` as `tcpass calibrate` draws
them now, or ``random`` as it did before) and the bench's (2 per class, noise seeds ``--seeds``) are
generated at full compute, each plan (and ``--baseline-steps`` plain DDIM steps) regenerates them,
and the mean PSNR vs full compute (clamped to [-1, 1]) is printed per class and overall.
Writes bench/results/<out>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_guidance_options, guidance_interval_of, machine, write_json  # noqa: E402
from tcpass.adapters import adapter_for  # noqa: E402
from tcpass.metrics import psnr  # noqa: E402
from tcpass.plan import CachePlan, load_plan  # noqa: E402
from tcpass.sampling import ddim_sample  # noqa: E402
from tcpass.torch_runtime import transform  # noqa: E402
from tcpass.zoo import REFERENCE_MODELS, reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCE_MODELS), default="emoji")
    parser.add_argument("--plan", type=Path, action="append", default=[], help="plan JSON (repeatable)")
    parser.add_argument("--baseline-steps", type=int, action="append", default=[], help="plain DDIM step count")
    parser.add_argument("--labels", choices=("stratified", "random"), default="stratified")
    parser.add_argument("--samples", type=int, default=18, help="calibration samples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="bench noise seeds")
    parser.add_argument("--steps", type=int, default=50)
    add_guidance_options(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="result file stem (default: <model>_plan_by_class)")
    args = parser.parse_args()
    if not args.plan and not args.baseline_steps:
        parser.error("give at least one --plan or --baseline-steps")
    torch.set_num_threads(args.threads)
    ref = reference(args.model)
    interval = guidance_interval_of(args, ref)
    model = ref.load_model(None).eval()
    base = CachePlan(blocks=(), model=adapter_for(model).fingerprint(model))
    arms = {p.stem: (load_plan(p), p.parent) for p in args.plan}
    arms.update({f"{n} steps": (dataclasses.replace(base, sampler_steps=n), None) for n in args.baseline_steps})

    def calibration_set() -> tuple[torch.Tensor, torch.Tensor]:
        """`tcpass.calibrate.collect`'s samples: from seed 1234 the labels first, then the noise."""
        g = torch.Generator().manual_seed(1234)
        if args.labels == "stratified":  # the model family's own calibration conditioning, as collect draws it
            labels = adapter_for(model).calibration_conditioning(model, args.samples, g)[0]["class_labels"]
        else:  # how `collect` drew DiT labels before they were stratified
            labels = torch.randint(0, ref.num_classes, (args.samples,), generator=g)
        return torch.randn(args.samples, *ref.image_shape, generator=g), labels

    balanced = torch.arange(ref.num_classes).repeat_interleave(2)  # the peers bench's labels and noise
    sets = {f"calibration ({args.labels} labels)": calibration_set()}
    for s in args.seeds:
        sets[f"bench seed {s}"] = (
            torch.randn(len(balanced), *ref.image_shape, generator=torch.Generator().manual_seed(s)),
            balanced,
        )

    def generate(denoiser, noise, labels, steps):
        return ddim_sample(
            denoiser, noise, labels, ref.null_label, steps, args.guidance, guidance_interval=interval
        ).clamp(-1, 1)

    transformed = {}  # (arm, model batch) -> transformed model: traced once, reset between generations

    def arm_model(arm: str, batch: int):
        if (arm, batch) not in transformed:
            plan, plan_dir = arms[arm]
            example = adapter_for(model).example_inputs(model, batch)
            transformed[arm, batch] = transform(model, plan, example_inputs=example, plan_dir=plan_dir)
        return transformed[arm, batch]

    result = {"machine": machine(), "config": vars(args) | {"plan": [str(p) for p in args.plan]}, "sets": {}}
    for set_name, (noise, labels) in sets.items():
        full = generate(model, noise, labels, args.steps)
        rows = {}
        for arm, (plan, _) in arms.items():
            tm = arm_model(arm, 2 * len(labels))
            tm.reset()
            db = psnr(generate(tm, noise, labels, plan.sampler_steps or args.steps), full, data_range=2.0)
            per_class = {
                name: (float(db[labels == c].mean()), int((labels == c).sum()))
                for c, name in enumerate(ref.class_names)
                if (labels == c).any()
            }
            rows[arm] = {"psnr_db": float(db.mean()), "per_class": per_class}
        result["sets"][set_name] = rows
        print(f"\n{set_name}: mean PSNR dB vs full compute (samples per class in brackets)")
        print(f"{'class':16}" + "".join(f"{arm:>32}" for arm in arms))
        for c, name in enumerate(ref.class_names):
            n = int((labels == c).sum())
            cells = "".join(f"{rows[a]['per_class'][name][0]:32.2f}" if n else f"{'-':>32}" for a in arms)
            print(f"{name + f' ({n})':16}{cells}")
        print(f"{'all':16}" + "".join(f"{rows[a]['psnr_db']:32.2f}" for a in arms))
    print(f"wrote {write_json((args.out or f'{args.model}_plan_by_class') + '.json', result)}")


if __name__ == "__main__":
    main()
