"""ONNX Runtime per-step times: uncached vs FULL vs CACHED, with and without the row-slice rewrite.

    taskset -c 1 python bench/ort_steps.py                 # DiT-S/2, default plan, 1 thread
    taskset -c 1 python bench/ort_steps.py --profile       # + ORT profiler: ms per op type per step

Exports the uncached model and the transformed one twice (``row_slices`` off: the exporter's
GatherElements/ScatterElements with a full cache copy per scatter; on: GatherND/ScatterND, caches
updated in place), then times every call of whole 50-step generations through the runtime,
interleaved, and reports the median ms per step kind and CACHED / uncached. Writes
bench/results/ort_steps.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpass  # noqa: E402
from bench.common import add_allocator_option, apply_allocator_option, machine, write_json  # noqa: E402
from bench.speed import DEFAULT_PLAN, example_inputs, load_model  # noqa: E402
from tcpass.export.onnx_export import export_onnx  # noqa: E402


def per_op_ms(profile: Path) -> dict[str, float]:
    """Median over calls of each node's kernel time, summed per op type (ms per call)."""
    times, ops = collections.defaultdict(list), {}
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["name"]].append(event["dur"])
            ops[event["name"]] = event["args"]["op_name"]
    total = collections.Counter()
    for node, durations in times.items():
        total[ops[node]] += statistics.median(durations) / 1e3
    return dict(total.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-s")
    parser.add_argument("--plan", type=Path, help="plan JSON (default: bench/speed.py's plan)")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--profile", action="store_true", help="also run ORT's profiler (separate sessions)")
    add_allocator_option(parser)
    parser.add_argument("--out", default="ort_steps.json", help="file name under bench/results/")
    args = parser.parse_args()
    apply_allocator_option(args)
    import onnxruntime as ort

    from tcpass.export.ort_runtime import OrtTokenCacheRuntime, ddim_schedule

    torch.set_num_threads(args.threads)
    plan = tcpass.load_plan(args.plan) if args.plan else DEFAULT_PLAN
    model = load_model(args.model)
    inputs = example_inputs(model, 2)  # one image with CFG
    null = int(model.config.num_embeds_ada_norm)
    root = Path(tempfile.mkdtemp(prefix="tcpass-ort-steps-"))
    base = tcpass.transform(model, tcpass.CachePlan.no_cache(), example_inputs=inputs)
    export_onnx(base, root / "uncached", inputs, null_label=null)
    transformed = tcpass.transform(model, plan, example_inputs=inputs)
    export_onnx(transformed, root / "elements", inputs, null_label=null, row_slices=False)
    export_onnx(transformed, root / "row_slices", inputs, null_label=null)

    def runtime(name: str, profile: bool = False) -> OrtTokenCacheRuntime:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.enable_profiling = profile
        options.profile_file_prefix = str(root / f"profile_{name}")
        return OrtTokenCacheRuntime(root / name, session_options=options)

    names = ("uncached", "elements", "row_slices")
    timesteps, _, _ = ddim_schedule(50)
    call = {k: v.numpy() for k, v in inputs.items()}

    def generation(rt: OrtTokenCacheRuntime, times: dict[str, list[float]] | None) -> None:
        for t in timesteps:
            before = rt.step_counts.copy()
            start = time.perf_counter()
            rt(**{**call, "timestep": np.full(2, t, np.int64)})
            elapsed = (time.perf_counter() - start) * 1e3
            kind = next(k.value for k in before if rt.step_counts[k] != before[k])
            if times is not None:
                times[kind].append(elapsed)

    runtimes = {n: runtime(n) for n in names}
    times = {n: collections.defaultdict(list) for n in names}
    for n in names:
        generation(runtimes[n], None)  # warm-up
    for _ in range(args.generations):
        for n in names:
            generation(runtimes[n], times[n])
    uncached = statistics.median(times["uncached"]["full"])
    rows = {}
    print(f"{'export':12} {'FULL ms':>8} {'CACHED ms':>10} {'CACHED/uncached':>16} {'10 FULL + 40 CACHED':>20}")
    for n in names:
        full = statistics.median(times[n]["full"])
        cached = statistics.median(times[n]["cached"]) if times[n]["cached"] else None
        estimate = 50 * uncached / (10 * full + 40 * cached) if cached else 1.0
        rows[n] = {"full_ms": full, "cached_ms": cached, "estimated_speedup": estimate, "all": times[n]}
        cached_text = f"{cached:10.1f} {cached / uncached:16.3f}" if cached else f"{'-':>10} {'-':>16}"
        print(f"{n:12} {full:8.1f} {cached_text} {estimate:19.2f}x")
    if args.profile:
        for n in names:
            rt = runtime(n, profile=True)
            for _ in range(2):
                generation(rt, None)
            rows[n]["profile_ms"] = {kind: per_op_ms(Path(s.end_profiling())) for kind, s in rt.sessions.items()}
            for kind, ops in rows[n]["profile_ms"].items():
                top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:6])
                print(f"{n:12} {kind:14} kernels {sum(ops.values()):6.1f} ms: {top}")
    path = write_json(
        args.out,
        {"machine": machine(), "ort_threads": args.threads, "model": args.model, "plan": plan.to_dict(), "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
