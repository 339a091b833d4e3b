"""Speed of TokenCache on PixArt-alpha, SD3-medium and Flux published configs (random weights), CPU.

Whole generations of these models take minutes per step on a 2-core CPU, so this bench times
single denoising steps instead: the uncached model, the FULL step and the CACHED step, interleaved
A/B/C in one run (``--reps`` rounds, median), and composes the generation speedup from the step mix
the TPRR schedule gives over the pipeline's own timesteps:

    speedup = steps * t_baseline / (n_full * t_full + n_cached * t_cached)

FLOP-ideal speedups count the FLOPs of the graphs actually run over that generation.

    python bench/families.py --models pixart-alpha,sd3-medium,flux-slice --reps 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tcpass  # noqa: E402
from bench.common import add_allocator_option, apply_allocator_option, machine, peak_rss_mib, summary, write_json  # noqa: E402
from tcpass.adapters import adapter_for  # noqa: E402
from tcpass.flops import generation_flops  # noqa: E402
from tcpass.schedule import StepKind  # noqa: E402


def _pixart_alpha():
    from diffusers import PixArtTransformer2DModel

    # PixArt-XL-2-512x512 (diffusers config): 64x64 latents -> 1024 image tokens, 120 T5 tokens
    return PixArtTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        cross_attention_dim=1152,
        sample_size=64,
        patch_size=2,
        caption_channels=4096,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def _sd3_medium():
    from diffusers import SD3Transformer2DModel

    # stable-diffusion-3-medium transformer config, at 512x512 (64x64 latents -> 1024 image tokens, 333 text)
    return SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )


def _flux_slice():
    from diffusers import FluxTransformer2DModel

    # FLUX.1-dev width (24 heads x 128, T5 4096, CLIP 768, guidance-distilled) with 2 double + 4 single blocks:
    # the published 19 + 38 blocks (12B parameters, 24 GB in bf16) do not fit in this machine's 24 GB.
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


MODELS = {"pixart-alpha": _pixart_alpha, "sd3-medium": _sd3_medium, "flux-slice": _flux_slice}
STEPS = {"pixart-alpha": 20, "sd3-medium": 28, "flux-slice": 28}  # the pipelines' default step counts

DEFAULT_PLAN = tcpass.CachePlan(
    keep_ratio=0.25,
    attention="cached_kv",
    schedule=tcpass.TPRRSchedule(boundary_timestep=500, intervals=(5, 5)),
)


def pipeline_timesteps(name: str, steps: int) -> list[float]:
    """The timesteps (0..1000 scale) the model's pipeline calls it at."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    sched = DPMSolverMultistepScheduler() if name == "pixart-alpha" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    return [float(t) for t in sched.timesteps]


def bench(name: str, plan: tcpass.CachePlan, reps: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, 2)  # one image with classifier-free guidance (Flux: batch 2 too)
    tm = tcpass.transform(model, plan, example_inputs=inputs)
    scale = adapter.timestep_scale
    t_in = adapter.timestep_input

    def at(t: float) -> dict:
        return {**inputs, t_in: torch.full_like(inputs[t_in], t / scale)}

    def step(m, t, kind=None):
        with torch.no_grad():
            start = time.perf_counter()
            m(**at(t), return_dict=False)
            elapsed = time.perf_counter() - start
        if kind is not None:
            assert tm.last_step.kind is kind, (tm.last_step, kind)
        return elapsed

    # warm-up (tracing happened in transform; first calls allocate)
    step(model, 999)
    step(tm, 999, StepKind.FULL)
    step(tm, 998, StepKind.CACHED)
    times: dict[str, list[float]] = {"baseline": [], "full": [], "cached": []}
    for _ in range(reps):
        times["baseline"].append(step(model, 999))
        times["full"].append(step(tm, 999, StepKind.FULL))  # 999 after 998: a new generation, FULL
        times["cached"].append(step(tm, 998, StepKind.CACHED))
    steps = STEPS[name]
    timesteps = pipeline_timesteps(name, steps)
    flops = generation_flops(tm, inputs, timesteps)
    med = {k: summary(v)["median"] for k, v in times.items()}
    composed = steps * med["baseline"] / (flops.num_full * med["full"] + flops.num_cached * med["cached"])
    return {
        "model": name,
        "config": dict(model.config),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "image_tokens": adapter.image_tokens(model, inputs),
        "text_tokens": int(inputs["encoder_hidden_states"].shape[1]),
        "batch": 2,
        "reps": reps,
        "step_s": {k: summary(v) for k, v in times.items()},
        "steps": steps,
        "steps_full_cached": [flops.num_full, flops.num_cached],
        "speedup_composed": composed,
        "cached_step_speedup": med["baseline"] / med["cached"],
        "full_step_overhead": med["full"] / med["baseline"] - 1,
        "flop_ideal_speedup": flops.ideal_speedup,
        "measured_over_ideal": composed / flops.ideal_speedup,
        "cache_mib": tm.step_graphs(inputs).cache_bytes / 2**20,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="pixart-alpha,sd3-medium,flux-slice", help=f"from {sorted(MODELS)}")
    parser.add_argument("--plan", type=Path, help="plan JSON (default: keep 25%%, cached K/V, intervals 5/5)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_allocator_option(parser)
    parser.add_argument("--out", default="speed_families.json", help="file name under bench/results/")
    args = parser.parse_args()
    apply_allocator_option(args)
    torch.set_num_threads(args.threads)
    plan = tcpass.load_plan(args.plan) if args.plan else DEFAULT_PLAN
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {sorted(MODELS)}")
        print(f"benchmarking {name}: {args.reps} interleaved rounds of (baseline, FULL, CACHED) steps", flush=True)
        rows.append(bench(name, plan, args.reps))
        r = rows[-1]
        s = r["step_s"]
        print(
            f"{name:13} {r['parameters_m']:6.0f}M params, {r['image_tokens']}+{r['text_tokens']} tokens: "
            f"baseline {s['baseline']['median']:.2f} s/step, FULL {s['full']['median']:.2f}, CACHED "
            f"{s['cached']['median']:.2f}; {r['steps']} steps {r['steps_full_cached']} -> "
            f"{r['speedup_composed']:.2f}x (FLOP-ideal {r['flop_ideal_speedup']:.2f}x)",
            flush=True,
        )
    path = write_json(args.out, {"machine": machine(), "plan": plan.to_dict(), "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
