"""Calibrated DPM-Solver++(2M) timesteps: a coordinate search of the step's training timesteps that maximizes
PSNR against 50 DDIM steps on calibration samples, scored on held-out samples (other noise and labels).

Nothing is cached or skipped: the question is how much a model-specific timestep schedule buys at the step
counts where the peers' best (DPM-Solver++ at fewer steps) sits at 4x and 6x, next to diffusers' three
timestep spacings for the same solver (the default ``linspace``, ``leading``, ``trailing``). Nothing is timed
(a schedule of N steps costs N model calls whatever its timesteps).

The search: start from diffusers' default spacing (or ``--start``: another spacing, or a plan's schedule to
refine); for each step size ``delta`` (e.g. 32, 16, 8, 4), move one timestep at a time by +-delta (keeping
them strictly decreasing in 1..999) and keep every move that raises the calibration PSNR, until no move does.
Each score is one whole generation of the calibration samples.

    python bench/timestep_search.py digits 8                       # the digits reference model, 8 steps
    python bench/timestep_search.py tcpass/zoo/emoji_dit 8 --samples 18 -o bench/plans/emoji_dpm8_timesteps.json
    python bench/timestep_search.py tcpass/zoo/emoji_dit 12 --samples 36 --start trailing --deltas 16 \
        -o bench/plans/emoji_dpm12_trailing_s36.json

Use enough calibration samples: at 12 emoji steps a search on 18 samples gained 1.76 dB on them and 0.02 dB
held out; on 36 it gained 1.97 dB and 1.43 dB held out (docs/benchmarks.md).

``-o``: a plan (`tcpass.CachePlan`: no block cached, ``sampler`` dpmpp, ``sampler_timesteps`` the schedule found)
that `bench/peers.py --plan` and `tcpass demo --plan` run.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcpass.adapters import adapter_for, load_transformer  # noqa: E402
from tcpass.calibrate import collect  # noqa: E402
from tcpass.calibrate.search import sample_psnr  # noqa: E402
from tcpass.calibrate.steps import reference_data  # noqa: E402
from tcpass.cli import _shipped_interval  # noqa: E402
from tcpass.plan import CachePlan, load_plan, save_plan  # noqa: E402
from tcpass.sampling import guided_sample, sampler_timesteps  # noqa: E402
from tcpass.zoo.digits import load_reference_model  # noqa: E402


def spacing(steps: int, name: str) -> list[int]:
    """diffusers' DPM-Solver++ timesteps for ``steps`` steps with ``timestep_spacing`` ``name``."""
    return [int(t) for t in sampler_timesteps(steps, "dpmpp", spacing=name)]


def load_model(name: str) -> torch.nn.Module:
    """``'digits'`` (the digits reference model) or a model directory."""
    return load_reference_model() if name == "digits" else load_transformer(name)


def scored_samples(model: torch.nn.Module, name: str, samples: int, seed: int):
    """``samples`` samples' noise and labels from ``seed``, with the model's shipped guidance interval, and their
    finals from 50 DDIM steps (`tcpass.calibrate.steps.reference_data`): what a schedule's PSNR is scored against."""
    data = collect(model, num_samples=samples, steps=2, sampler="dpmpp", sample_range=(-1, 1),
                   guidance_interval=_shipped_interval(None if name == "digits" else name), seed=seed,
                   progress=False)  # fmt: skip
    return reference_data(model, data, "ddim", 50)


def start_timesteps(start: str, steps: int) -> list[int]:
    """The schedule the search starts from: a spacing name, or the ``sampler_timesteps`` of a plan file."""
    if start in ("linspace", "leading", "trailing"):
        return spacing(steps, start)
    ts = load_plan(start).sampler_timesteps
    if ts is None or len(ts) != steps:
        raise SystemExit(f"--start {start}: the plan has sampler_timesteps {ts}, not {steps} of them; pass a plan "
                         f"calibrated for {steps} steps or a spacing (linspace, leading, trailing)")  # fmt: skip
    return [int(t) for t in ts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="'digits' (the digits reference model) or a model directory")
    ap.add_argument("steps", type=int, help="DPM-Solver++ steps")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--deltas", type=int, nargs="+", default=[32, 16, 8, 4], help="search step sizes (timesteps)")
    ap.add_argument("--seeds", type=int, nargs=2, default=[1234, 4321], help="calibration seed, held-out seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--start", default="linspace",
                    help="where the search starts: a spacing (linspace, leading, trailing) or a plan JSON whose "
                         "sampler_timesteps it refines")  # fmt: skip
    ap.add_argument("-o", "--out", type=Path, help="write the plan with the schedule found (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    first = start_timesteps(args.start, args.steps)  # refused before any work
    model = load_model(args.model)
    sets = [scored_samples(model, args.model, args.samples, seed) for seed in args.seeds]

    def score(timesteps: list[int], which: int) -> float:
        d = sets[which]
        samples = guided_sample(
            model, d.noise, d.cond, d.uncond, args.steps, d.guidance_scale, guidance_interval=d.guidance_interval,
            sampler="dpmpp", timesteps=timesteps,
        )  # fmt: skip
        return sample_psnr(samples, d)

    print(f"{args.model}, {args.steps} DPM-Solver++(2M) steps, {args.samples} samples, PSNR against 50 DDIM steps "
          f"(calibration seed {args.seeds[0]}, held-out seed {args.seeds[1]})", flush=True)  # fmt: skip
    for name in ("linspace", "leading", "trailing"):
        ts = spacing(args.steps, name)
        print(f"spacing {name:8s} {ts}: calibration {score(ts, 0):.2f} dB, held out {score(ts, 1):.2f} dB", flush=True)
    ts, start = first, time.time()
    best = score(ts, 0)
    print(f"start {args.start}: {ts}: calibration {best:.2f} dB", flush=True)
    for delta in args.deltas:
        moved = True
        while moved:
            moved = False
            for i in range(len(ts)):
                hi = 999 if i == 0 else ts[i - 1] - 1
                lo = 1 if i == len(ts) - 1 else ts[i + 1] + 1
                for t in (ts[i] + delta, ts[i] - delta):
                    if lo <= t <= hi:
                        trial = ts[:i] + [t] + ts[i + 1 :]
                        psnr = score(trial, 0)
                        if psnr > best + 1e-3:
                            ts, best, moved = trial, psnr, True
                            print(f"  moved timestep {i} to {t}: calibration {best:.2f} dB "
                                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
        print(f"searched delta {delta:2d} {ts}: calibration {best:.2f} dB, held out {score(ts, 1):.2f} dB "
              f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    if args.out:
        notes = {
            "method": "tcpass calibrated timesteps",
            "calibrated_by": "bench/timestep_search.py " + " ".join(sys.argv[1:]),
            "psnr_db": {"calibration": round(best, 3), "held_out": round(score(ts, 1), 3)},
            "scored_against": {"sampler": "ddim", "steps": 50},
            "seeds": {"calibration": args.seeds[0], "held_out": args.seeds[1]},
        }
        plan = CachePlan(blocks=[], model=adapter_for(model).fingerprint(model), sampler="dpmpp",
                         sampler_timesteps=ts, notes=notes)  # fmt: skip
        save_plan(plan, args.out)
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
