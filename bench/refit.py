"""Forecasts composed with token or block caching: weights fitted on the table alone vs on the composed plan.

A calibration composes skip tables that carry fitted forecasts with token or block caching on their
computed calls (`tcpass.calibrate.steps.composed_candidates`). Its skipped calls then forecast from the
residuals the CACHED calls leave, not from full compute's. This bench takes the compositions of forecast
tables a calibration report recorded, regenerates its calibration data (same seed, samples, sampler and
guidance: calibration data, not the bench's seeds), and scores each twice on it: with the weights fitted on
the table alone (the recorded plan, which must reproduce the recorded PSNR) and with weights fitted again on
the composed plan (`tcpass.calibrate.forecast.fit_forecast` with ``base``). Nothing is timed.

    python bench/refit.py --model tcpass/zoo/emoji_dit --samples 18 --sampler dpmpp --steps 25 \\
        --report bench/plans/emoji_dpm25_4x.calibration.json --out refit_emoji_dpm25_4x
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, write_json  # noqa: E402


def composed_forecasts(report: dict) -> list[dict]:
    """The candidates of a calibration report that compose a fitted-forecast table ("... forecast N + ...")."""
    return [c for c in report["candidates"] if re.search(r" forecast \d+ \+ ", c["name"])]


def main(argv: list[str] | None = None) -> dict:
    from tcpass import CachePlan
    from tcpass.adapters import load_transformer
    from tcpass.calibrate import collect
    from tcpass.calibrate.forecast import fit_forecast
    from tcpass.calibrate.search import fidelity, sample_psnr
    from tcpass.cli import _shipped_interval
    from tcpass.zoo.digits import load_reference_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the digits reference model)")
    p.add_argument("--report", action="append", required=True, help="a calibration report (repeatable)")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="result name under bench/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_reference_model() if args.model is None else load_transformer(args.model)
    data = collect(
        model, num_samples=args.samples, steps=args.steps, progress=False, sample_range=(-1.0, 1.0),
        guidance_interval=_shipped_interval(args.model), sampler=args.sampler,
    )  # fmt: skip
    rows = []
    for path in args.report:
        report = json.loads(Path(path).read_text())
        for c in tqdm(composed_forecasts(report), desc=Path(path).stem):
            plan = CachePlan.from_dict(c["plan"])
            start = time.perf_counter()
            alone = fidelity(model, plan, data)
            fit = fit_forecast(model, plan.skip, data, plan.skip.history, base=dataclasses.replace(plan, skip=None))
            rows.append(
                {
                    "report": path,
                    "name": c["name"],
                    "family": c["family"],
                    "predicted_speedup": c["predicted_speedup"],
                    "recorded_psnr_db": c["psnr_db"],
                    "table_fit_psnr_db": alone,
                    "composed_fit_psnr_db": sample_psnr(fit.samples, data),
                    "seconds": time.perf_counter() - start,
                }
            )
            r = rows[-1]
            print(
                f"{r['name']}: recorded {r['recorded_psnr_db']:.2f}, table fit {alone:.2f}, "
                f"composed fit {r['composed_fit_psnr_db']:.2f} dB",
                flush=True,
            )
    gains = sorted(r["composed_fit_psnr_db"] - r["table_fit_psnr_db"] for r in rows)
    summary = {"n": len(rows), "median_gain_db": statistics.median(gains) if gains else None, "gains_db": gains}
    result = {"machine": machine(), "rows": rows, "summary": summary}
    print(f"wrote {write_json(args.out + '.json', result)}")
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
