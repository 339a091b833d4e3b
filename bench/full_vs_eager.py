"""Per-call time of the uncached model vs tcpass's FULL step graph (should be equal), interleaved.

    python bench/full_vs_eager.py
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 python bench/full_vs_eager.py

The reference model at batch 40 with the calibrated 2x plan; median of 8 calls, 3 rounds each.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpass  # noqa: E402
from bench.speed import example_inputs, load_model  # noqa: E402


def median_ms(fn, calls: int = 8) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    model = load_model("digits")
    inputs = example_inputs(model, 40)  # 20 images with CFG
    values = list(inputs.values())
    plan = tcpass.load_plan(Path(__file__).parent / "plans" / "digits_2x.json")
    graphs = tcpass.transform(model, plan, example_inputs=inputs).step_graphs()
    eager, full = [], []
    with torch.no_grad():
        for _ in range(3):
            eager.append(median_ms(lambda: model(**inputs)))
            full.append(median_ms(lambda: graphs.full(*values, *graphs.caches)))
    print(f"eager ms per call {[round(x) for x in eager]}, FULL graph {[round(x) for x in full]}")


if __name__ == "__main__":
    main()
