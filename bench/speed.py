"""Wall-clock speed of tcpass vs the uncached model, whole 50-step DDIM generations, interleaved A/B.

    python bench/speed.py                       # DiT-S/2 and DiT-XL/2, 5 rounds
    python bench/speed.py --models dit-s --reps 3 --plan my_plan.json
    python bench/speed.py --models digits --images 20 --plan bench/plans/digits_2x.json   # trained reference model

Real architectures at their published sizes with random weights (speed does not depend on the
weights; ``digits`` is the shipped trained reference model). Model batch 2 x ``--images`` (default
one image with classifier-free guidance). Prints a table and writes
bench/results/speed.json. glibc malloc's mmap/trim thresholds are pinned for both arms
(``--malloc-default`` to leave them adaptive; see tcpass.timing.pin_allocator).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
from tcpass.sampling import ddim_sample, make_scheduler  # noqa: E402

# Published DiT configs (diffusers), 256x256 images -> 32x32 latents -> 256 tokens.
MODELS = {
    "dit-s": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12),
    "dit-xl": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28),
    "digits": None,  # the shipped trained reference model (tcpass.zoo.digits)
}
COMMON = dict(in_channels=4, out_channels=8, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)

# FLOP-ideal ~2.5x on DiT-XL/2 over 50 DDIM steps.
DEFAULT_PLAN = tcpass.CachePlan(
    keep_ratio=0.25,
    attention="cached_kv",
    schedule=tcpass.TPRRSchedule(boundary_timestep=500, intervals=(5, 5)),
)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = (b.max() - b.min()).item()
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


class OrtGenerator:
    """A whole generation on ONNX Runtime (numpy DDIM + CFG), from an exported directory."""

    def __init__(self, directory: Path, steps: int, threads: int) -> None:
        from tcpass.export.runtime import OrtTokenCacheRuntime

        self.runtime = OrtTokenCacheRuntime(directory, threads=threads)
        self.steps = steps
        self.step_counts = self.runtime.step_counts

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from tcpass.export.runtime import generate

        return torch.from_numpy(generate(self.runtime, noise.numpy(), labels.numpy(), self.steps, 4.0))


def load_model(name: str):
    if name == "digits":
        from tcpass.zoo.digits import load_reference_model

        return load_reference_model()
    torch.manual_seed(0)
    return DiTTransformer2DModel(**MODELS[name], **COMMON).eval()


def example_inputs(model, images: int) -> dict[str, torch.Tensor]:
    cfg = model.config
    null = int(cfg.num_embeds_ada_norm)
    labels = torch.arange(images) % null
    return {
        "hidden_states": torch.randn(2 * images, cfg.in_channels, cfg.sample_size, cfg.sample_size),
        "timestep": torch.full((2 * images,), 999),
        "class_labels": torch.cat([labels, torch.full_like(labels, null)]),
    }


def ort_pair(model, tm, steps: int):
    """Export the uncached model and the transformed one the same way; ORT generators for both."""
    import tempfile

    from tcpass.export.onnx_export import export_onnx

    root = Path(tempfile.mkdtemp(prefix="tcpass-bench-"))
    inputs = example_inputs(model, 1)
    null = int(model.config.num_embeds_ada_norm)
    export_onnx(
        tcpass.transform(model, tcpass.CachePlan.no_cache(), example_inputs=inputs),
        root / "base",
        inputs,
        null_label=null,
    )
    export_onnx(tm, root / "tcpass", inputs, null_label=null)
    threads = torch.get_num_threads()
    return OrtGenerator(root / "base", steps, threads), OrtGenerator(root / "tcpass", steps, threads)


def bench_model(
    name: str, plan: tcpass.CachePlan, steps: int, reps: int, executor: str, images: int = 1, plan_dir=None
) -> dict:
    """One model, one executor: baseline and tcpass both eager, or both compiled with the same backend."""
    model = load_model(name)
    cfg = model.config
    null = int(cfg.num_embeds_ada_norm)
    example = example_inputs(model, images)
    noise = torch.randn(
        images, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(1)
    )
    labels = example["class_labels"][:images]
    if executor == "ort" and images != 1:
        raise ValueError("the ORT rows are exported for one image (model batch 2); use --images 1.")
    tm = tcpass.transform(
        model,
        plan,
        example_inputs=example,
        plan_dir=plan_dir,
        backend=None if executor in ("eager", "ort") else executor,
    )
    if executor == "eager":
        baseline = model
    elif executor == "ort":
        baseline, tm = ort_pair(model, tm, steps)
    else:
        baseline = torch.compile(model, backend=executor, fullgraph=True, dynamic=False)

    def generate(m):
        if isinstance(m, OrtGenerator):
            return m(noise, labels)
        return ddim_sample(m, noise, labels, null_label=null, num_steps=steps, guidance_scale=4.0)

    first_call = {}
    for label, m in (("baseline", baseline), ("tcpass", tm)):
        start = time.perf_counter()
        generate(m)  # includes compilation for compiled executors
        first_call[label] = time.perf_counter() - start
    times = interleaved({"baseline": lambda: generate(baseline), "tcpass": lambda: generate(tm)}, reps)
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    flops_model = (
        tm
        if isinstance(tm, tcpass.TokenCacheTransformer)
        else tcpass.transform(model, plan, example_inputs=example, plan_dir=plan_dir)
    )
    flops = generation_flops(flops_model, example, [float(t) for t in scheduler.timesteps])
    flops_model(**example)  # fills the caches once, for their size
    speedup = ratio_median(times["baseline"], times["tcpass"])
    return {
        "model": name,
        "executor": executor,
        "first_generation_s": first_call,
        "config": dict(cfg),
        "steps": steps,
        "batch": 2 * images,
        "reps": reps,
        "baseline_s": summary(times["baseline"]),
        "tcpass_s": summary(times["tcpass"]),
        "speedup": speedup,
        "flop_ideal_speedup": flops.ideal_speedup,
        "measured_over_ideal": speedup / flops.ideal_speedup,
        "gflops_per_generation": {"baseline": flops.baseline / 1e9, "tcpass": flops.transformed / 1e9},
        "steps_full_cached": [flops.num_full, flops.num_cached],
        "cache_mib": flops_model.cache_bytes / 2**20,
        "psnr_vs_baseline_db_random_weights": psnr(generate(tm), generate(baseline)),
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dit-s,dit-xl", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--images", type=int, default=1, help="images per generation (model batch 2x: CFG)")
    parser.add_argument("--plan", type=Path, help="plan JSON (default: the built-in ~2.5x plan)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--executors",
        default="eager",
        help="comma-separated: eager, inductor (compiled A/B), ort (ONNX Runtime CPU A/B)",
    )
    parser.add_argument("--threads", type=int, default=2)
    add_allocator_option(parser)
    parser.add_argument("--out", default="speed.json", help="file name under bench/results/")
    args = parser.parse_args()
    apply_allocator_option(args)
    torch.set_num_threads(args.threads)
    plan = tcpass.load_plan(args.plan) if args.plan else DEFAULT_PLAN
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {sorted(MODELS)}")
        for executor in args.executors.split(","):
            if executor not in ("eager", "inductor", "ort"):
                parser.error(f"--executors: unknown executor {executor!r}; choose from eager, inductor, ort")
            print(f"benchmarking {name}, {executor}: {args.reps} rounds of {args.steps}-step generations", flush=True)
            plan_dir = args.plan.parent if args.plan else None
            if executor == "inductor":
                from torch._inductor.utils import fresh_cache

                with fresh_cache():  # an empty on-disk compile cache: first_generation_s includes a cold compile
                    rows.append(bench_model(name, plan, args.steps, args.reps, executor, args.images, plan_dir))
            else:
                rows.append(bench_model(name, plan, args.steps, args.reps, executor, args.images, plan_dir))
    header = (
        f"{'model':8} {'executor':9} {'baseline s':>16} {'tcpass s':>16} {'speedup':>8} {'FLOP-ideal':>10} "
        f"{'meas/ideal':>10} {'cache MiB':>9}"
    )
    print(header)
    for r in rows:
        b, t = r["baseline_s"], r["tcpass_s"]
        print(
            f"{r['model']:8} {r['executor']:9} {b['median']:7.2f} [{b['min']:.2f}-{b['max']:.2f}] {t['median']:6.2f} "
            f"[{t['min']:.2f}-{t['max']:.2f}] {r['speedup']:7.2f}x {r['flop_ideal_speedup']:9.2f}x "
            f"{r['measured_over_ideal']:10.2f} {r['cache_mib']:9.1f}"
        )
    path = write_json(args.out, {"machine": machine(), "plan": plan.to_dict(), "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
