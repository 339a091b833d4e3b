"""Split guidance with the unconditional rows at one in every few computed guided steps
(``CachePlan.guidance_every``, FasterCache's CFG cache) on a calibrated digits plan, against fewer
DPM-Solver++ steps, on the calibration data (seed 1234, not the benches' seeds). Nothing is timed: the cost
is counted in model calls (a split call of B rows is half a batched one).

    python bench/guidance_every.py bench/plans/digits_dpm25_4x_ref.json
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcpass import StepKind, load_plan, transform  # noqa: E402
from tcpass.calibrate import collect  # noqa: E402
from tcpass.calibrate.search import sample_psnr  # noqa: E402
from tcpass.zoo.digits import load_reference_model  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, n = load_reference_model(), 20
    data = collect(model, num_samples=n, steps=25, sampler="dpmpp", sample_range=(-1, 1), progress=False)
    ref = collect(model, num_samples=n, steps=50, sample_range=(-1, 1), progress=False)
    ddim = dataclasses.replace(data, final=ref.final)  # scored as the benches score: against 50 DDIM steps
    for k in (7, 8, 9):
        print(f"{k} DPM-Solver++ steps: {sample_psnr(data.sample(model, k), ddim):.2f} dB, {k} batched calls")
    base = load_plan(sys.argv[1])
    for every in (None, 1, 2, 3, 4):
        plan = base if every is None else dataclasses.replace(base, guidance_reuse=True, guidance_every=every)
        tm = transform(model, plan, example_inputs=data.call_inputs())
        psnr = sample_psnr(data.sample(tm, plan.sampler_steps or data.steps), ddim)
        computed = tm.step_counts[StepKind.FULL] + tm.step_counts[StepKind.CACHED]
        calls = computed if every is None else computed / 2  # split: B-row calls
        what = "batched guidance" if every is None else f"split, unconditional rows every {every}"
        print(f"{sys.argv[1]} {what}: {psnr:.2f} dB, {calls:g} batched calls")


if __name__ == "__main__":
    main()
