"""Is the DPM-Solver++ peer configured at its strongest? diffusers' DPMSolverMultistepScheduler options at a few
steps, each scored by PSNR against 50 DDIM steps on the held-out samples `bench/timestep_search.py` scores on.

The peers bench (`bench/peers.py --methods dpmpp`) runs `tcpass.sampling.make_scheduler("dpmpp")`: second
order, ``linspace`` timesteps, first order at the last step below 15 steps. This prints that configuration
beside the others a user could pick (third order, Karras or log-SNR-uniform sigmas, ``trailing`` spacing, the
SDE variant, the midpoint solver, no first-order last step), so a calibrated plan's margin is read against the
best of them. Untimed: every option costs one model call per step.

    python bench/solver_options.py tcpass/zoo/emoji_dit 12 --samples 18
"""

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from diffusers import DPMSolverMultistepScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpass.sampling  # noqa: E402
from bench.timestep_search import load_model, scored_samples  # noqa: E402
from tcpass.calibrate.search import sample_psnr  # noqa: E402

OPTIONS = {  # name: DPMSolverMultistepScheduler settings over tcpass's "dpmpp" ones
    "2M, linspace (the bench's peer)": {},
    "2M, trailing": {"timestep_spacing": "trailing"},
    "2M, no first-order last step": {"lower_order_final": False},
    "2M, midpoint solver": {"solver_type": "heun"},
    "2M, Karras sigmas": {"use_karras_sigmas": True},
    "2M, log-SNR-uniform (lu) lambdas": {"use_lu_lambdas": True},
    "3M, linspace": {"solver_order": 3},
    "3M, trailing": {"solver_order": 3, "timestep_spacing": "trailing"},
    "2M SDE": {"algorithm_type": "sde-dpmsolver++"},  # stochastic: its noise is not seeded here
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="'digits' (the digits reference model) or a model directory")
    ap.add_argument("steps", type=int, help="DPM-Solver++ steps")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=4321, help="the samples' seed (timestep_search.py's held-out one)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    d = scored_samples(model, args.model, args.samples, args.seed)
    base = tcpass.sampling.make_scheduler
    print(f"{args.model}, {args.steps} DPM-Solver++ steps, {args.samples} samples (seed {args.seed}), "
          "PSNR against 50 DDIM steps", flush=True)  # fmt: skip
    for name, settings in OPTIONS.items():

        def make(*a, _settings=settings, **k):
            scheduler = base(*a, **k)
            return DPMSolverMultistepScheduler.from_config(scheduler.config, **_settings)

        start = time.time()
        with mock.patch.object(tcpass.sampling, "make_scheduler", make):
            out = tcpass.sampling.guided_sample(
                model, d.noise, d.cond, d.uncond, args.steps, d.guidance_scale,
                guidance_interval=d.guidance_interval, sampler="dpmpp",
            )  # fmt: skip
        print(f"{name:34s} {sample_psnr(out, d):6.2f} dB  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
