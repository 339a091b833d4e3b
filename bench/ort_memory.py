"""ONNX Runtime memory with and without one shared copy of the weights (`OrtTokenCacheRuntime(share_weights=)`).

    python bench/ort_memory.py                      # DiT-XL/2, bench/speed.py's default plan, 1 thread
    python bench/ort_memory.py --export /tmp/xl     # reuse (or keep) the export there

Exports the transformed model once (DiT-XL/2: ~3 GB of weights, a few minutes), then:
- memory: for each setting, a fresh process loads the runtime and runs a FULL then a CACHED call; it
  reports RSS after loading, after the calls and its peak (VmHWM), in MiB;
- speed: one process holds both runtimes and times whole ``--steps``-call generations of each, interleaved
  (``--rounds`` pairs), reporting the median ms per FULL and per CACHED call and shared / unshared.
Writes bench/results/ort_memory.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, write_json  # noqa: E402


def _status() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


def _inputs(runtime, t: int) -> dict[str, np.ndarray]:
    out = {}
    for spec in runtime.manifest["conditioning_inputs"]:
        dtype = np.dtype(spec["dtype"])
        value = np.full(spec["shape"], t) if spec["name"] == runtime.timestep_input else np.zeros(spec["shape"])
        out[spec["name"]] = value.astype(dtype)
    return out


def measure_memory(directory: str, share: bool, threads: int) -> dict:
    """In this process: load, then one FULL and one CACHED call; RSS at each point (MiB)."""
    from tcpass.export.ort_runtime import OrtTokenCacheRuntime

    before = _status()["VmRSS"]
    start = time.perf_counter()
    runtime = OrtTokenCacheRuntime(directory, threads=threads, share_weights=share, verify_checksums=False)
    loaded, load_s = _status()["VmRSS"], time.perf_counter() - start
    for t in (900, 880):  # FULL, then CACHED
        runtime(**_inputs(runtime, t))
    status = _status()
    return {
        "share_weights": share,
        "rss_start_mib": before,
        "rss_loaded_mib": loaded,
        "rss_after_calls_mib": status["VmRSS"],
        "peak_rss_mib": status["VmHWM"],
        "load_s": load_s,
        "step_counts": {k.value: v for k, v in runtime.step_counts.items()},
    }


def measure_speed(directory: str, threads: int, steps: int, rounds: int) -> dict:
    """Both runtimes in one process, whole generations interleaved; median ms per FULL / CACHED call."""
    from tcpass.export.ort_runtime import OrtTokenCacheRuntime
    from tcpass.schedule import StepKind

    runtimes = {s: OrtTokenCacheRuntime(directory, threads=threads, share_weights=s) for s in (False, True)}
    times: dict[bool, dict[str, list[float]]] = {s: {"full": [], "cached": []} for s in runtimes}
    timesteps = np.linspace(999, 0, steps).astype(int)
    for runtime in runtimes.values():  # warm-up
        for t in timesteps[:3]:
            runtime(**_inputs(runtime, int(t)))
    for _ in range(rounds):
        for share, runtime in runtimes.items():
            for t in timesteps:
                start = time.perf_counter()
                runtime(**_inputs(runtime, int(t)))
                kind = runtime.last_step.kind
                if kind in (StepKind.FULL, StepKind.CACHED):
                    times[share][kind.value].append(1e3 * (time.perf_counter() - start))
    out = {}
    for kind in ("full", "cached"):
        unshared, shared = (statistics.median(times[s][kind]) for s in (False, True))
        out[kind] = {
            "unshared_ms": unshared,
            "shared_ms": shared,
            "shared_over_unshared": shared / unshared,
            "calls": len(times[True][kind]),
            "unshared_range_ms": [min(times[False][kind]), max(times[False][kind])],
            "shared_range_ms": [min(times[True][kind]), max(times[True][kind])],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-xl")
    parser.add_argument("--export", type=Path, help="export directory (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--steps", type=int, default=10, help="calls per timed generation")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved generation pairs")
    parser.add_argument("--measure", choices=["shared", "unshared"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_memory(str(args.export), args.measure == "shared", args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.export or Path(tmp) / "export"
        if not (directory / "manifest.json").is_file():
            import torch

            import tcpass
            from bench.speed import DEFAULT_PLAN, example_inputs, load_model
            from tcpass.export.onnx_export import export_onnx

            torch.manual_seed(0)
            model = load_model(args.model)
            inputs = example_inputs(model, 2)
            export_onnx(tcpass.transform(model, DEFAULT_PLAN, example_inputs=inputs), directory)
            del model
        memory = []
        for setting in ("unshared", "shared"):
            command = [sys.executable, __file__, "--export", str(directory), "--threads", str(args.threads)]
            done = subprocess.run([*command, "--measure", setting], check=True, capture_output=True, text=True)
            memory.append(json.loads(done.stdout.strip().splitlines()[-1]))
        speed = measure_speed(str(directory), args.threads, args.steps, args.rounds)
        weights_mib = (directory / "weights.bin").stat().st_size / 2**20
    print(f"{args.model}: weights.bin {weights_mib:.0f} MiB, {args.threads} thread(s)")
    print(f"{'':10} {'loaded':>9} {'after FULL+CACHED':>18} {'peak':>9} {'load s':>7}  (RSS, MiB)")
    for row in memory:
        name = "shared" if row["share_weights"] else "unshared"
        print(
            f"{name:10} {row['rss_loaded_mib']:9.0f} {row['rss_after_calls_mib']:18.0f} {row['peak_rss_mib']:9.0f}"
            f" {row['load_s']:7.1f}"
        )
    for kind, row in speed.items():
        print(
            f"{kind:7} call: unshared {row['unshared_ms']:.0f} ms, shared {row['shared_ms']:.0f} ms "
            f"(x{row['shared_over_unshared']:.3f}, {row['calls']} calls each)"
        )
    write_json(
        "ort_memory.json",
        {
            "model": args.model,
            "threads": args.threads,
            "weights_mib": weights_mib,
            "memory": memory,
            "speed": speed,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
