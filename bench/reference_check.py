"""Calibration candidates scored against two full computes, on the calibration data (seed 1234).

A plan calibrated with ``--sampler dpmpp --steps 25`` is scored, by default, against 25-step DPM-Solver++
full compute; the benches (`bench/peers.py`) score every arm against 50-step DDIM full compute. This prints,
for the best skip-only candidates a calibration report recorded, the PSNR against both, and the PSNR between
the two full computes themselves. Nothing is timed.

    python bench/reference_check.py tcpass/zoo/emoji_dit bench/plans/emoji_dpm25_4x.calibration.json 18
    python bench/reference_check.py digits REPORT 20     # the digits reference model
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcpass import CachePlan, transform  # noqa: E402
from tcpass.adapters import load_transformer  # noqa: E402
from tcpass.calibrate import collect  # noqa: E402
from tcpass.calibrate.search import sample_psnr  # noqa: E402
from tcpass.cli import _shipped_interval  # noqa: E402
from tcpass.zoo.digits import load_reference_model  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model_path, report, n = sys.argv[1] if sys.argv[1] != "digits" else None, sys.argv[2], int(sys.argv[3])
    model = load_reference_model() if model_path is None else load_transformer(model_path)
    gi = _shipped_interval(model_path)
    data = collect(
        model, num_samples=n, steps=25, sampler="dpmpp", sample_range=(-1, 1), guidance_interval=gi, progress=False
    )
    ref = collect(model, num_samples=n, steps=50, sample_range=(-1, 1), guidance_interval=gi, progress=False)
    ddim = dataclasses.replace(data, final=ref.final)
    print(f"dpm25 full vs ddim50 full: {sample_psnr(data.final, ddim):.2f} dB", flush=True)
    d = json.loads(Path(report).read_text())
    cands = sorted(d["candidates"], key=lambda x: -x["psnr_db"])
    pick = [c for c in cands if "+" not in c["name"]][:12]
    for c in pick:
        plan = CachePlan.from_dict(c["plan"])
        tm = transform(model, plan, example_inputs=data.call_inputs())
        s = data.sample(tm, plan.sampler_steps or data.steps)
        print(
            f"{c['predicted_speedup']:.2f} rec {c['psnr_db']:.2f} vs-dpm25 {sample_psnr(s, data):.2f} "
            f"vs-ddim50 {sample_psnr(s, ddim):.2f} | {c['name']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
