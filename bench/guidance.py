"""Where to apply classifier-free guidance: class accuracy of full-compute samples per guidance setting.

    python bench/guidance.py --model emoji          # the default sweep below, 8 samples per class (~18 min)
    python bench/guidance.py --model emoji --setting 4:100:700 --setting 4:0:1000

Each ``--setting SCALE:LO:HI`` samples every class ``--per-class`` times (same noise and labels for every
setting; 50-step DDIM) with guidance ``SCALE`` at model timesteps ``LO <= t < HI`` and the conditional
prediction alone elsewhere (`tcpass.sampling.guided_sample`; ``0:1000`` guides every step). The reference
model's independent classifier scores each sample. Writes bench/results/<model>_guidance_interval.json and
one sample grid per setting (<model>_guidance_<SCALE>_<LO>_<HI>.png) beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine, write_json  # noqa: E402
from bench.samples import save_sample_grid  # noqa: E402
from tcpass.sampling import ddim_sample, describe_guidance  # noqa: E402
from tcpass.schedule import check_guidance_interval  # noqa: E402
from tcpass.zoo import REFERENCE_MODELS, reference  # noqa: E402

DEFAULT_SETTINGS = (
    "4:0:1000",
    "4:0:700",
    "4:100:1000",
    "4:100:700",
    "6:100:700",
    "4:100:800",
    "5:200:700",
    "4:200:600",
)


def parse_setting(text: str) -> tuple[float, tuple[float, float]]:
    """``"SCALE:LO:HI"`` -> ``(scale, (lo, hi))``; raises ``argparse.ArgumentTypeError`` naming the fix."""
    try:
        scale, lo, hi = (float(v) for v in text.split(":"))
        return scale, check_guidance_interval((lo, hi))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SCALE:LO:HI, e.g. 4:100:700 ({e})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCE_MODELS), default="emoji")
    parser.add_argument("--setting", type=parse_setting, action="append", help="SCALE:LO:HI (repeatable)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = args.setting or [parse_setting(s) for s in DEFAULT_SETTINGS]
    ref = reference(args.model)
    model, classifier = ref.load_model(None), ref.load_classifier()
    real, real_labels = ref.held_out()
    labels = torch.arange(ref.num_classes).repeat_interleave(args.per_class)
    noise = torch.randn(len(labels), *ref.image_shape, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for scale, interval in settings:
        start = time.perf_counter()
        samples = ddim_sample(
            model, noise, labels, ref.null_label, args.steps, scale, guidance_interval=interval
        ).clamp(-1, 1)
        with torch.no_grad():
            predicted = classifier(samples).argmax(1)
        per_class = {
            name: (predicted[labels == c] == c).float().mean().item() for c, name in enumerate(ref.class_names)
        }
        name = describe_guidance(scale, interval)
        grid = RESULTS / f"{args.model}_guidance_{scale:g}_{interval[0]:g}_{interval[1]:g}.png"
        save_sample_grid(ref, samples, labels, real, real_labels, grid, f"{args.model} DiT, {name}")
        rows.append(
            {
                "guidance_scale": scale,
                "guidance_interval": list(interval),
                "class_accuracy": (predicted == labels).float().mean().item(),
                "class_accuracy_per_class": per_class,
                "seconds": round(time.perf_counter() - start, 1),
                "grid": grid.name,
            }
        )
        print(f"{name:32} class accuracy {rows[-1]['class_accuracy']:6.1%}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    out = write_json(
        f"{args.model}_guidance_interval.json",
        {
            "machine": machine(),
            "config": {"model": args.model, "per_class": args.per_class, "steps": args.steps, "seed": args.seed},
            "settings": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
