"""Wall-clock speed of tcpass vs the uncached model: whole DDIM generations, interleaved A/B, per
executor, device, dtype and batch size.

    python bench/speed.py                       # DiT-S/2 and DiT-XL/2, CPU, float32, 5 rounds
    python bench/speed.py --models dit-s --reps 3 --plan my_plan.json
    python bench/speed.py --models digits --batches 40 --plan bench/plans/digits_2x.json   # trained reference

    # the GPU matrix (docs/compile.md, "The GPU matrix"): DiT-XL/2, bfloat16, every executor, model batches 2, 16 and 64
    python bench/speed.py --device cuda --dtype bfloat16 --models dit-xl --batches 2,16,64 --reps 3 \\
        --executors eager,inductor,reduce-overhead,ort --out speed_gpu_bfloat16.json

Real architectures at their published sizes with random weights (speed does not depend on the
weights; ``digits`` is the shipped trained reference model). ``--batches`` are model batch sizes:
with classifier-free guidance, batch 2 is one image. Each row is one model, batch and executor, with
the baseline and tcpass under the same executor:

- ``eager``: both run eagerly.
- ``inductor``: both compiled (``torch.compile``, fullgraph, static shapes), default mode.
- ``reduce-overhead``: both compiled with ``mode="reduce-overhead"`` (CUDA graphs). On CUDA the row
  fails if inductor skipped CUDA graphs for any graph (its ``cudagraph_skips`` counter; the skip
  messages are recorded). On CPU inductor skips them for the device, which the row records.
- ``ort``: ONNX Runtime, both exported the same way (CUDA execution provider on ``--device cuda``
  when onnxruntime-gpu provides it, else the row is skipped, saying so). bfloat16 rows are skipped:
  ONNX Runtime has no bfloat16 kernels for a DiT.

Every row also reports per-step times (ms, median over the steps of one instrumented generation per
arm, synchronized around each call): ``uncached`` (baseline), ``full`` and ``cached`` (tcpass);
peak GPU memory per arm on CUDA (``torch.cuda.max_memory_allocated``), the process's peak RSS on
CPU; and for compiled executors, graphs compiled after the first generation (must be 0) and the
tcpass sample vs the eager transformed model's (within the dtype's tolerance). A row with a failed
check has ``status: failed`` and the reasons. Timing on CUDA synchronizes before reading the clock.

The JSON (bench/results/``--out``) is rewritten after every row, so a run stopped by a time limit
keeps its finished rows; ``--time-budget`` stops starting new rows after that many seconds.
glibc malloc's mmap/trim thresholds are pinned for both arms on CPU (``--malloc-default`` to leave
them adaptive; see tcpass.timing.pin_allocator).
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiTTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpass  # noqa: E402
from bench.common import (  # noqa: E402
    add_allocator_option,
    apply_allocator_option,
    interleaved,
    machine,
    peak_rss_mib,
    ratio_median,
    summary,
    write_json,
)
from tcpass.flops import generation_flops  # noqa: E402
from tcpass.sampling import ddim_sample, ddim_timesteps  # noqa: E402

# Published DiT configs (diffusers), 256x256 images -> 32x32 latents -> 256 tokens.
MODELS = {
    "dit-s": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12),
    "dit-xl": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28),
    "digits": None,  # the shipped trained reference model (tcpass.zoo.digits)
}
COMMON = dict(in_channels=4, out_channels=8, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
EXECUTORS = ("eager", "inductor", "reduce-overhead", "ort")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# tcpass compiled vs tcpass eager, whole generation: max |difference| / max |eager sample|
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}

# FLOP-ideal ~2.5x on DiT-XL/2 over 50 DDIM steps.
DEFAULT_PLAN = tcpass.CachePlan(
    keep_ratio=0.25,
    attention="cached_kv",
    schedule=tcpass.TPRRSchedule(boundary_timestep=500, intervals=(5, 5)),
)


def psnr_db(test: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR (dB) of ``test``'s samples against ``reference``'s, peak = the reference's value range."""
    from tcpass.metrics import psnr

    test, reference = test.float().cpu(), reference.float().cpu()
    return float(np.mean(psnr(test, reference, data_range=float(reference.max() - reference.min()))))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OrtGenerator:
    """A whole generation on ONNX Runtime (numpy sampler + CFG: the export plan's, DDIM by default), from an exported
    directory."""

    def __init__(self, directory: Path, steps: int, threads: int, providers: list[str] | None = None) -> None:
        from tcpass.export.ort_runtime import OrtTokenCacheRuntime

        self.runtime = OrtTokenCacheRuntime(directory, threads=threads, providers=providers)
        self.steps = steps
        self.step_counts = self.runtime.step_counts

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor, runtime=None) -> torch.Tensor:
        from tcpass.export.ort_runtime import generate

        out = generate(runtime or self.runtime, noise.cpu().numpy(), labels.cpu().numpy(), self.steps, 4.0)
        return torch.from_numpy(out)


class StepTimer:
    """Wraps a model (or ORT runtime): times every call (synchronized) under the step kind it ran.

    ``uncached``: every call of the baseline; tcpass calls are keyed by the `StepKind` its
    ``step_counts`` advanced. Attribute reads (``dtype``, ``input_dtype``...) go to the wrapped model.
    """

    def __init__(self, model, device: torch.device, baseline: bool) -> None:
        self.model, self.device, self.baseline = model, device, baseline
        self.ms: dict[str, list[float]] = collections.defaultdict(list)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["model"], name)

    def __call__(self, *args, **kwargs):
        before = None if self.baseline else dict(self.model.step_counts)
        synchronize(self.device)
        start = time.perf_counter()
        out = self.model(*args, **kwargs)
        synchronize(self.device)
        elapsed = (time.perf_counter() - start) * 1e3
        if before is None:
            kind = "uncached"
        else:
            kind = next(k.value for k, n in self.model.step_counts.items() if n != before.get(k, 0))
        self.ms[kind].append(elapsed)
        return out


def load_model(name: str):
    if name == "digits":
        from tcpass.zoo.digits import load_reference_model

        return load_reference_model()
    torch.manual_seed(0)
    return DiTTransformer2DModel(**MODELS[name], **COMMON).eval()


def example_inputs(model, batch: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Model inputs for ``batch`` rows: ``batch // 2`` images with classifier-free guidance."""
    cfg = model.config
    null = int(cfg.num_embeds_ada_norm)
    labels = torch.arange(batch // 2) % null
    size = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return {
        "hidden_states": torch.randn(size).to(device=device, dtype=model.dtype),
        "timestep": torch.full((batch,), 999, device=device),
        "class_labels": torch.cat([labels, torch.full_like(labels, null)]).to(device),
    }


def ort_providers(device: torch.device) -> list[str]:
    """Execution providers for ``device``; raises RuntimeError (the row's skip reason) where there is none."""
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {ort.get_available_providers()}); "
            "install onnxruntime-gpu (`pip install tcpass[gpu]`) for the ORT rows on CUDA."
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_pair(model, plan, batch: int, steps: int, device: torch.device, plan_dir=None):
    """Export the uncached model and the transformed one the same way (from a CPU copy); ORT generators."""
    from tcpass.export.onnx_export import export_onnx

    providers = ort_providers(device)
    cpu_model = copy.deepcopy(model).cpu()
    root = Path(tempfile.mkdtemp(prefix="tcpass-bench-"))
    inputs = example_inputs(cpu_model, batch)
    null = int(model.config.num_embeds_ada_norm)
    uncached = tcpass.transform(cpu_model, tcpass.CachePlan.no_cache(), example_inputs=inputs)
    export_onnx(uncached, root / "base", inputs, null_label=null)
    export_onnx(tcpass.transform(cpu_model, plan, example_inputs=inputs, plan_dir=plan_dir), root / "tcpass", inputs)
    threads = torch.get_num_threads()
    return (
        OrtGenerator(root / "base", steps, threads, providers),
        OrtGenerator(root / "tcpass", steps, threads, providers),
    )


class CudagraphSkips(logging.Handler):
    """Collects inductor's "skipping cudagraphs due to ..." messages (its ``cudagraphs`` log artifact)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def watch_cudagraph_skips() -> CudagraphSkips:
    from torch._inductor.cudagraph_utils import cudagraphs_log

    torch._logging.set_logs(cudagraphs=True)
    handler = CudagraphSkips()
    cudagraphs_log.addHandler(handler)
    return handler


def peak_memory_mib(fn, device: torch.device) -> float | None:
    """Peak GPU memory allocated by torch during ``fn()`` (MiB); None off CUDA."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_row(
    name: str,
    model,
    plan: tcpass.CachePlan,
    steps: int,
    reps: int,
    executor: str,
    batch: int,
    device: torch.device,
    plan_dir=None,
    skips: CudagraphSkips | None = None,
) -> dict:
    """One model, one batch, one executor: baseline and tcpass under the same executor."""
    from torch._dynamo.utils import counters

    if batch < 2 or batch % 2:
        raise ValueError(f"batch {batch}: model batches are even (classifier-free guidance doubles the images).")
    cfg, dtype = model.config, model.dtype
    null = int(cfg.num_embeds_ada_norm)
    example = example_inputs(model, batch, device)
    images = batch // 2
    size = (images, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    noise = torch.randn(size, generator=torch.Generator().manual_seed(1)).to(device)
    labels = example["class_labels"][:images]
    row = {"model": name, "executor": executor, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    row.update({"batch": batch, "steps": steps, "reps": reps, "config": dict(cfg)})
    compiled = executor in ("inductor", "reduce-overhead")
    mode = "reduce-overhead" if executor == "reduce-overhead" else None
    eager_tm = tcpass.transform(model, plan, example_inputs=example, plan_dir=plan_dir)
    if executor == "ort":
        baseline, tm = ort_pair(model, plan, batch, steps, device, plan_dir)
    elif compiled:
        torch._dynamo.reset()
        baseline = torch.compile(model, backend="inductor", mode=mode, fullgraph=True, dynamic=False)
        tm = tcpass.transform(
            model, plan, example_inputs=example, plan_dir=plan_dir, backend="inductor", compile_mode=mode
        )
    else:
        baseline, tm = model, eager_tm

    def generate(m, timer: StepTimer | None = None):
        if isinstance(m, OrtGenerator):
            return m(noise, labels, runtime=timer)
        return ddim_sample(timer or m, noise, labels, null_label=null, num_steps=steps, guidance_scale=4.0)

    def timed(m):
        def run():
            out = generate(m)
            synchronize(device)
            return out

        return run

    counters.clear()
    skips_before = skips.messages[:] if skips else []
    first_call, samples = {}, {}
    for label, m in (("baseline", baseline), ("tcpass", tm)):
        synchronize(device)
        start = time.perf_counter()
        samples[label] = timed(m)()  # includes compilation for compiled executors
        first_call[label] = time.perf_counter() - start
    graphs_after_first = counters["stats"]["unique_graphs"]
    times = interleaved({"baseline": timed(baseline), "tcpass": timed(tm)}, reps)

    per_step: dict[str, dict] = {}
    for label, m in (("baseline", baseline), ("tcpass", tm)):
        timer = StepTimer(m.runtime if isinstance(m, OrtGenerator) else m, device, baseline=label == "baseline")
        generate(m, timer)
        for kind, ms in timer.ms.items():
            per_step[kind] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "calls": len(ms)}
    memory = {label: peak_memory_mib(timed(m), device) for label, m in (("baseline", baseline), ("tcpass", tm))}

    flops = generation_flops(eager_tm, example, ddim_timesteps(steps))
    speedup = ratio_median(times["baseline"], times["tcpass"])
    failures = []
    if compiled:
        recompiled = counters["stats"]["unique_graphs"] - graphs_after_first
        row["graphs_compiled_after_first_generation"] = recompiled
        if recompiled:
            failures.append(f"{recompiled} graphs compiled after the first generation")
    if executor == "reduce-overhead":
        skipped = int(counters["inductor"]["cudagraph_skips"])
        row["cudagraph_skips"] = skipped
        row["cudagraph_skip_messages"] = sorted(set((skips.messages if skips else [])[len(skips_before) :]))
        if device.type == "cuda" and skipped:
            failures.append(f"inductor skipped CUDA graphs {skipped} times: {row['cudagraph_skip_messages']}")
        elif device.type != "cuda":
            row["cudagraphs"] = "not on CPU: inductor skips CUDA graphs for the device"
    if compiled:
        want = generate(eager_tm)
        rel = ((samples["tcpass"].float() - want.float()).abs().max() / want.float().abs().max()).item()
        row["tcpass_vs_eager_transformed"] = {"max_rel_error": rel, "psnr_db": psnr_db(samples["tcpass"], want)}
        if not rel <= TOLERANCE[dtype]:
            failures.append(f"tcpass compiled vs eager: relative error {rel:.2e} > {TOLERANCE[dtype]:.0e}")
    row.update(
        {
            "status": "failed: " + "; ".join(failures) if failures else "ok",
            "first_generation_s": first_call,
            "baseline_s": summary(times["baseline"]),
            "tcpass_s": summary(times["tcpass"]),
            "speedup": speedup,
            "flop_ideal_speedup": flops.ideal_speedup,
            "measured_over_ideal": speedup / flops.ideal_speedup,
            "per_step": per_step,
            "gflops_per_generation": {"baseline": flops.baseline / 1e9, "tcpass": flops.transformed / 1e9},
            "steps_full_cached": [flops.num_full, flops.num_cached],
            "cache_mib": eager_tm.cache_bytes / 2**20,
            "peak_gpu_memory_mib": memory,
            "psnr_vs_baseline_db_random_weights": psnr_db(generate(tm), generate(baseline)),
            "peak_rss_mib": peak_rss_mib(),
        }
    )
    return row


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':7} {'dtype':8} {'executor':15} {'batch':>5} {'baseline s':>18} {'tcpass s':>18} {'speedup':>8} "
        f"{'ideal':>6} {'m/i':>5} {'unc/full/cach ms':>20} {'peak MiB b/t':>13}  status"
    )
    for r in rows:
        if "speedup" not in r:
            print(f"{r['model']:7} {r['dtype']:8} {r['executor']:15} {r['batch']:5}  {r['status']}")
            continue
        b, t, s, m = r["baseline_s"], r["tcpass_s"], r["per_step"], r["peak_gpu_memory_mib"]
        ms = "/".join(f"{s[k]['median_ms']:.1f}" if k in s else "-" for k in ("uncached", "full", "cached"))
        mem = "-" if m["baseline"] is None else f"{m['baseline']:.0f}/{m['tcpass']:.0f}"
        print(
            f"{r['model']:7} {r['dtype']:8} {r['executor']:15} {r['batch']:5} "
            f"{b['median']:7.3f} [{b['min']:.2f}-{b['max']:.2f}] {t['median']:7.3f} [{t['min']:.2f}-{t['max']:.2f}] "
            f"{r['speedup']:7.2f}x {r['flop_ideal_speedup']:5.2f}x {r['measured_over_ideal']:5.2f} {ms:>20} "
            f"{mem:>13}  {r['status']}"
        )


def parse_list(parser, flag: str, text: str, choices=None, convert=str) -> list:
    items = []
    for item in text.split(","):
        try:
            value = convert(item)
        except ValueError:
            parser.error(f"{flag}: {item!r} is not a number")
        if choices is not None and value not in choices:
            parser.error(f"{flag}: unknown {item!r}; choose from {', '.join(choices)}")
        items.append(value)
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dit-s,dit-xl", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--batches", default="2", help="comma-separated model batch sizes (even: CFG doubles)")
    parser.add_argument("--plan", type=Path, help="plan JSON (default: the built-in ~2.5x plan)")
    parser.add_argument(
        "--plan-structure",
        action="store_true",
        help="run --plan on models it was not calibrated for: its schedule, skip table and forecast weights "
        "as they are, its model fingerprint dropped (speed of a plan's structure at another size)",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--executors", default="eager", help=f"comma-separated, from {', '.join(EXECUTORS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; no new row starts after it")
    add_allocator_option(parser)
    parser.add_argument("--out", default="speed.json", help="file name under bench/results/")
    args = parser.parse_args()
    models = parse_list(parser, "--models", args.models, sorted(MODELS))
    executors = parse_list(parser, "--executors", args.executors, EXECUTORS)
    batches = parse_list(parser, "--batches", args.batches, convert=int)
    if any(b < 2 or b % 2 for b in batches):
        parser.error(f"--batches: {args.batches}: model batches are even and >= 2 (CFG: 2 rows per image)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if device.type == "cpu":
        apply_allocator_option(args)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    plan = tcpass.load_plan(args.plan) if args.plan else DEFAULT_PLAN
    if args.plan_structure:
        plan = dataclasses.replace(plan, model=None)
    plan_dir = args.plan.parent if args.plan else None
    skips = watch_cudagraph_skips() if device.type == "cuda" and "reduce-overhead" in executors else None
    started = time.perf_counter()
    rows: list[dict] = []
    payload = {"machine": machine(), "args": vars(args), "plan": plan.to_dict(), "results": rows}
    if device.type == "cuda":
        payload["machine"]["gpu"] = torch.cuda.get_device_name(device)
    for name in models:
        model = load_model(name).to(device=device, dtype=dtype)
        for batch in batches:
            for executor in executors:
                where = {"model": name, "executor": executor, "batch": batch, "dtype": args.dtype}
                if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                    rows.append({**where, "status": f"not run: --time-budget {args.time_budget:.0f} s spent"})
                    continue
                print(f"{name}, batch {batch}, {executor}, {args.dtype} on {device}: {args.reps} rounds", flush=True)
                try:
                    rows.append(
                        bench_row(name, model, plan, args.steps, args.reps, executor, batch, device, plan_dir, skips)
                    )
                except (RuntimeError, TypeError) as e:
                    if executor != "ort":
                        raise
                    rows.append({**where, "status": f"skipped: {e}"})  # no CUDA provider, or a bfloat16 export
                path = write_json(args.out, payload)
    print_table(rows)
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
