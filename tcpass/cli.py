"""The `tcpass` command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from tcpass.export import OPSETS

POSITIVE = click.IntRange(min=1)


def _plan_file(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    """Load the plan up front, so a bad file is one line naming the file and field, before any work."""
    if path is not None:
        from tcpass.plan import load_plan

        try:
            load_plan(path)
        except (ValueError, FileNotFoundError) as e:
            raise click.BadParameter(str(e)) from e
    return path


def _guidance_interval(ctx: click.Context, param: click.Parameter, value):
    from tcpass.schedule import check_guidance_interval

    try:
        return check_guidance_interval(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def guidance_interval_option(default_help: str):
    return click.option(
        "--guidance-interval",
        type=(float, float),
        default=None,
        callback=_guidance_interval,
        help="Model timesteps LO HI (of 0..1000) classifier-free guidance applies at; the conditional prediction "
        f"alone elsewhere. 0 1000 guides every step. Default: {default_help}",
    )


def _shipped_interval(model_path) -> tuple[float, float] | None:
    """The guidance interval of the shipped reference model whose weights are at ``model_path``, if any."""
    from tcpass.zoo import sampler_for

    ref = sampler_for(model_path)
    return None if ref is None else ref.guidance_interval


def _output_file(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    """Fail before the run, not after it, when the output's directory does not exist."""
    if path is not None and not path.parent.is_dir():
        raise click.BadParameter(f"{path}: directory {path.parent} does not exist; create it first.")
    return path


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tcpass")
def main() -> None:
    """TokenCache for diffusion transformers, as a compiler pass."""


@main.command()
@click.option(
    "--model",
    default="digits",
    show_default=True,
    help="Reference model from the registry (tcpass.zoo.REFERENCE_MODELS): digits or emoji.",
)
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="DiT directory with the same classes (default: the reference model's shipped weights).",
)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    callback=_plan_file,
    help="Plan JSON (default: the reference model's demo plan, its best calibrated plan).",
)
@click.option("--steps", type=POSITIVE, default=50, show_default=True, help="DDIM steps.")
@click.option("--guidance", default=4.0, show_default=True, help="Classifier-free guidance scale.")
@guidance_interval_option("the reference model's own (emoji: 100 700; digits: every step).")
@click.option("--per-class", type=POSITIVE, default=1, show_default=True, help="Samples per class.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--rounds", type=POSITIVE, default=3, show_default=True, help="Timed generations per variant (after a warm-up)."
)
@click.option("--threads", type=POSITIVE, default=2, show_default=True, help="torch CPU threads.")
@click.option(
    "--malloc-default",
    is_flag=True,
    help="Leave glibc malloc's adaptive thresholds on (by default they are pinned so neither variant's "
    "frees slow the other down; see tcpass.timing.pin_allocator).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("tcpass_demo.png"),
    show_default=True,
    callback=_output_file,
    help="Where to write the PNG grid (its directory must exist).",
)
def demo(
    model,
    model_dir,
    plan_path,
    steps,
    guidance,
    guidance_interval,
    per_class,
    seed,
    rounds,
    threads,
    malloc_default,
    out,
) -> None:
    """Full compute vs tcpass on a shipped reference DiT: speed, fidelity, class accuracy, a PNG."""
    import torch

    from tcpass.timing import pin_allocator

    if not malloc_default:
        pin_allocator()
    from tcpass.sampling import describe_guidance
    from tcpass.zoo import REFERENCE_MODELS
    from tcpass.zoo.demo import describe_plan, format_table, run_demo, save_grid

    if model not in REFERENCE_MODELS:
        raise click.BadParameter(
            f"{model!r} is not a reference model; known: {sorted(REFERENCE_MODELS)}.", param_hint="--model"
        )
    torch.set_num_threads(threads)
    result = run_demo(
        model, model_dir, plan_path, steps, guidance, per_class, seed, rounds, guidance_interval=guidance_interval
    )
    click.echo(
        f"plan: {describe_plan(result.plan, steps)}; {describe_guidance(guidance, result.guidance_interval)}, "
        f"{model} model, {len(result.labels)} samples, median of {rounds} rounds"
    )
    click.echo(format_table(result))
    click.echo(f"wrote {save_grid(result, out).resolve()}")


@main.command()
@click.option("--model", "model", required=True, help="diffusers pipeline directory or hub id.")
@click.option("--prompt", default=None, help="Text prompt (PixArt, SD3, Flux, Wan).")
@click.option("--class-label", type=int, default=None, help="Class id (DiT).")
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    callback=_plan_file,
    help="TokenCache plan JSON; without it the pipeline runs unchanged.",
)
@click.option("--steps", type=POSITIVE, default=28, show_default=True, help="Denoising steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: the pipeline's).")
@click.option(
    "--height", type=POSITIVE, default=None, help="Image or video height in pixels (default: the pipeline's)."
)
@click.option("--width", type=POSITIVE, default=None, help="Image or video width in pixels (default: the pipeline's).")
@click.option(
    "--frames", type=POSITIVE, default=None, help="Video frames (default: the pipeline's); video pipelines only."
)
@click.option(
    "--fps",
    type=POSITIVE,
    default=None,
    help="Frames per second of the video file (default: 16, Wan's); video pipelines only.",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    callback=_output_file,
    help="Where to write the image or video (its directory must exist); the suffix names the format: a video "
    "is .mp4 (needs the video extra), .webp or .gif (animated). Default: tcpass.png, or tcpass.mp4 for a video.",
)
def generate(
    model, prompt, class_label, plan_path, steps, seed, guidance, height, width, frames, fps, dtype, out
) -> None:
    """Generate one image or video with a diffusers pipeline, its transformer running TokenCache."""
    import torch

    from tcpass.generate import DEFAULT_FPS, check_output, is_video_pipeline, load_pipeline, write_image, write_video
    from tcpass.generate import generate as run
    from tcpass.plan import load_plan

    plan = load_plan(plan_path) if plan_path else None
    try:
        pipe = load_pipeline(model, getattr(torch, dtype))
        video = is_video_pipeline(pipe)
        if fps is not None and not video:
            raise ValueError(f"--fps {fps}: {type(pipe).__name__} makes an image, not a video; leave --fps out.")
        out = out or Path("tcpass.mp4" if video else "tcpass.png")
        check_output(pipe, out)
        result = run(
            pipe,
            plan,
            plan_path.parent if plan_path else None,
            prompt=prompt,
            class_label=class_label,
            steps=steps,
            seed=seed,
            guidance=guidance,
            height=height,
            width=width,
            frames=frames,
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    steps_note = f" ({result.steps})" if result.steps else ""
    if result.frames is None:
        write_image(result.image, out)
        click.echo(f"{result.seconds:.2f} s{steps_note}; wrote {out.resolve()}")
    else:
        fps = fps or DEFAULT_FPS
        write_video(result.frames, out, fps)
        click.echo(
            f"{result.seconds:.2f} s{steps_note}; wrote {len(result.frames)} frames at {fps} fps to {out.resolve()}"
        )


@main.command("export")
@click.option("--model", "model_path", required=True, help="Transformer directory (or pipeline dir, or hub id).")
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    callback=_plan_file,
    required=True,
)
@click.option(
    "--batch",
    type=POSITIVE,
    default=2,
    show_default=True,
    help="Model batch the graphs are fixed to (2 = 1 image + CFG).",
)
@click.option(
    "--null-label",
    type=click.IntRange(min=0),
    default=None,
    help="Class label of CFG's unconditional rows (default and only accepted value: the model config's).",
)
@guidance_interval_option(
    "a shipped reference model's own (emoji: 100 700), else every step. Recorded in the manifest; the numpy "
    "runtime's generate() and `tcpass serve --runtime ort` guide there."
)
@click.option(
    "--opset",
    type=click.IntRange(OPSETS.start, OPSETS.stop - 1),
    default=20,
    show_default=True,
    help="ONNX opset (the exporter writes these natively; the manifest records the one written).",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory to write; new, empty, or an earlier export (replaced whole, atomically).",
)
def export_command(model_path, plan_path, batch, null_label, guidance_interval, opset, out_dir) -> None:
    """Export step-specialized ONNX graphs + manifest.json for ONNX Runtime (needs the onnx extra)."""
    try:
        from tcpass.export.onnx_export import export_onnx
    except ImportError as e:
        raise click.ClickException(str(e)) from e
    from tcpass.adapters import adapter_for, load_transformer
    from tcpass.plan import load_plan
    from tcpass.torch_runtime import transform

    try:
        model = load_transformer(model_path)
        plan = load_plan(plan_path)
        inputs = adapter_for(model).example_inputs(model, batch)
        manifest = export_onnx(
            transform(model, plan, example_inputs=inputs, plan_dir=plan_path.parent),
            out_dir,
            inputs,
            opset=opset,
            null_label=null_label,
            guidance_interval=guidance_interval or _shipped_interval(model_path),
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    for name, size in sizes.items():
        click.echo(f"  {name:24} {size / 2**20:8.2f} MiB")
    click.echo(f"total {sum(sizes.values()) / 2**20:.2f} MiB; wrote {manifest}")


class _MethodGroup(click.Group):
    """``tcpass calibrate tokens|steps [OPTIONS]``; the older ``tcpass calibrate [--policy tokens|steps]
    [OPTIONS]`` still works (no method named: ``tokens``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            rest, method = list(args), "tokens"
            for i, arg in enumerate(rest):
                if arg == "--policy" and i + 1 < len(rest):
                    method = rest.pop(i + 1)
                    rest.pop(i)
                    break
                if arg.startswith("--policy="):
                    method = rest.pop(i).split("=", 1)[1]
                    break
            if method not in self.commands:
                raise click.BadParameter(
                    f"{method!r}: expected one of {sorted(self.commands)}, e.g. `tcpass calibrate steps`.",
                    param_hint="--policy",
                )
            args = [method, *rest]
        return super().parse_args(ctx, args)


@main.group(cls=_MethodGroup)
def calibrate() -> None:
    """Find a plan for a model against a speed or quality target.

    \b
    tokens: token caching (predictor, blocks, TPRR); the default.
    steps:  a skip table of whole steps (MagCache rule, spread skips, fitted forecasts, token caching
            composed) or fewer sampler steps, whichever keeps the most PSNR at the target.

    `tcpass calibrate METHOD --help` lists each method's options.
    """


def _calibration_options(function):
    """The options both calibration methods take: model, target, calibration generations, sampler, output."""
    options = [
        click.option(
            "--model", "model_path", default=None, help="Transformer directory (default: the shipped reference DiT)."
        ),
        click.option(
            "--target-speedup",
            type=click.FloatRange(min=1, min_open=True),
            default=None,
            help="Wall-clock speedup to reach on this machine, e.g. 2.0 (above 1).",
        ),
        click.option(
            "--min-psnr", type=float, default=None, help="Or: quality floor, dB of final samples vs full compute."
        ),
        click.option(
            "--batch",
            type=POSITIVE,
            default=2,
            show_default=True,
            help="Model batch the speed is timed at (2 = 1 image + CFG).",
        ),
        click.option(
            "--samples",
            type=POSITIVE,
            default=16,
            show_default=True,
            help="Calibration samples generated with full compute.",
        ),
        click.option(
            "--steps",
            type=POSITIVE,
            default=50,
            show_default=True,
            help="Sampler steps of the calibration generations (the family's sampler: DDIM for DiT and PixArt, "
            "flow matching for SD3 and Flux).",
        ),
        click.option(
            "--sample-range",
            type=(float, float),
            default=None,
            help="Range a viewer sees, LO HI: calibration samples are scored clamped to it (pixel-space models: "
            "-1 1; default: -1 1 for the shipped reference model, else the samples' 0.1-99.9 percentile range).",
        ),
        click.option(
            "--verify-rounds",
            type=click.IntRange(min=0),
            default=2,
            show_default=True,
            help="Interleaved whole-generation timings (after a warm-up) that verify a plan's speed against full "
            "compute; more rounds tell a 1.8x plan from a 2x one more surely on a busy machine (each costs about "
            "two generations; 0: trust the per-call predictions).",
        ),
        click.option(
            "--guidance",
            type=float,
            default=4.0,
            show_default=True,
            help="Classifier-free guidance scale of the calibration generations (the sampler the plan will run under).",
        ),
        guidance_interval_option("a shipped reference model's own (emoji: 100 700), else every step."),
        click.option("--threads", type=POSITIVE, default=2, show_default=True, help="torch CPU threads."),
        click.option(
            "-o", "--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="Plan JSON to write."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _calibration_setup(
    model_path, target_speedup, min_psnr, batch, samples, steps, sample_range, verify_rounds, guidance,
    guidance_interval, threads, sampler=None,
):  # fmt: skip
    """Check the common options, load the model, print the sampler (``sampler``: the one chosen, else the family's);
    returns the model and the common arguments."""
    import torch

    from tcpass.adapters import adapter_for, load_transformer
    from tcpass.sampling import describe_guidance
    from tcpass.timing import pin_allocator
    from tcpass.zoo.digits import load_reference_model

    if (target_speedup is None) == (min_psnr is None):
        raise click.UsageError("give exactly one of --target-speedup (e.g. 2.0) or --min-psnr (e.g. 30).")
    pin_allocator()  # speeds are measured here: the same allocator setting as `tcpass demo` and the benches
    torch.set_num_threads(threads)
    try:
        model = load_reference_model() if model_path is None else load_transformer(model_path)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if sample_range is None and model_path is None:
        sample_range = (-1.0, 1.0)  # the reference model generates pixels in [-1, 1]
    if sample_range is not None and not sample_range[0] < sample_range[1]:
        raise click.BadParameter(f"{sample_range}: LO must be below HI.", param_hint="--sample-range")
    if guidance_interval is None:
        guidance_interval = _shipped_interval(model_path)
    family = adapter_for(model)
    sampler = sampler or family.sampler
    shift = family.flow_shift if sampler == family.sampler else 1.0
    name = {"ddim": "DDIM", "dpmpp": "DPM-Solver++(2M)"}.get(sampler, f"flow matching (shift {shift:g})")
    click.echo(f"calibration sampler: {steps}-step {name}, {describe_guidance(guidance, guidance_interval)}")
    common = {
        "target_speedup": target_speedup,
        "min_psnr": min_psnr,
        "batch": batch,
        "num_samples": samples,
        "steps": steps,
        "sample_range": sample_range,
        "guidance_scale": guidance,
        "guidance_interval": guidance_interval,
        "verify_reps": verify_rounds,
    }
    return model, common


def _echo_report(report, out: Path) -> None:
    """Print a calibration's report and the files it wrote; draw its frontier beside the plan."""
    click.echo(report.format())
    weights = report.plan.selector.path
    click.echo(f"wrote {Path(out).resolve()}" + (f" and {weights}" if weights else ""))
    try:
        from tcpass.calibrate import plot_frontier

        click.echo(f"wrote {plot_frontier(report, Path(out).with_suffix('.frontier.png')).resolve()}")
    except ImportError:
        click.echo("(no frontier plot: matplotlib is not installed; pip install 'tcpass[plots]')")


@calibrate.command("tokens")
@_calibration_options
@click.option(
    "--predictor",
    type=click.Choice(["dynamic", "static", "input_change"]),
    default="dynamic",
    show_default=True,
    help="Token selector to train (input_change: training-free).",
)
@click.option(
    "--attention",
    type=click.Choice(["full_kv", "cached_kv", "kept_only"]),
    multiple=True,
    default=("cached_kv", "full_kv"),
    show_default=True,
    help="Attention mode(s) to search (repeatable).",
)
@click.option(
    "--token-forecast",
    "forecasts",
    multiple=True,
    default=("reuse",),
    show_default=True,
    help="What pruned tokens get, searched like the attention modes (repeatable): reuse, or kind:order of a "
    "forecaster (anchored:1, anchored:2, taylor:1, taylor:2), each optionally +W: cluster propagation of weight W "
    "(taylor:1+0.5, reuse+1). Each one searched costs about one more search.",
)
@click.option(
    "--iterations", type=click.IntRange(min=0), default=120, show_default=True, help="Predictor training iterations."
)
@click.option(
    "--keep-ratio",
    "keep_ratios",
    type=click.FloatRange(min=0, max=1, min_open=True),
    multiple=True,
    default=(0.1, 0.15, 0.25, 0.35, 0.5),
    show_default=True,
    help="Fractions of tokens recomputed at cached steps to search (repeatable).",
)
def calibrate_tokens(predictor, attention, forecasts, iterations, keep_ratios, out, **common_options):
    """Token caching: train a token selector, pick the blocks, the TPRR schedule and what pruned tokens get
    (tcpass.calibrate)."""
    from tcpass.calibrate import calibrate as run
    from tcpass.plan import parse_forecast

    try:
        specs = tuple(dict.fromkeys(parse_forecast(f) for f in forecasts))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--token-forecast") from e
    model, common = _calibration_setup(**common_options)
    report = run(
        model,
        out,
        predictor=predictor,
        attention=attention,
        forecasts=specs,
        iterations=iterations,
        ratios=tuple(sorted(set(keep_ratios))),
        **common,
    )
    _echo_report(report, out)


@calibrate.command("steps")
@_calibration_options
@click.option(
    "--forecast",
    type=click.IntRange(min=0),
    default=12,
    show_default=True,
    help="Also fit forecast weights for up to this many MagCache-rule tables near the target "
    "(0: plain reuse only); each fit costs about one full-compute generation.",
)
@click.option(
    "--forecast-history",
    type=click.IntRange(1, 4),
    multiple=True,
    default=(3,),
    show_default=True,
    help="Computed steps a forecast reads (repeatable: one fit per value).",
)
@click.option(
    "--compose",
    "compose",
    type=(click.FloatRange(0, 1), click.IntRange(min=2)),
    multiple=True,
    default=((0.25, 2), (0.0, 2)),
    show_default=True,
    help="Token caching composed with skip tables, KEEP INTERVAL: of every INTERVAL computed "
    "calls one is FULL, the others recompute KEEP of the tokens in every block, or in the least sensitive half "
    "of them (both are tried; repeatable). KEEP 0 is block-level: the least sensitive half of the blocks do not "
    "run at those calls.",
)
@click.option(
    "--compose-forecast",
    "compose_forecasts",
    multiple=True,
    default=("reuse", "anchored:1"),
    show_default=True,
    help="What the tokens or blocks a composition does not compute get (repeatable; each one tried with every "
    "--compose): reuse, or kind:order of a forecaster (anchored:1 forecasts a whole block as TaylorSeer does).",
)
@click.option(
    "--max-composed",
    type=click.IntRange(min=0),
    default=12,
    show_default=True,
    help="At most this many skip + token/block compositions near the target are generated (0: none).",
)
@click.option(
    "--speed-tolerance",
    type=click.FloatRange(0, 0.5, max_open=True),
    default=0.03,
    show_default=True,
    help="A plan measured at (1 - this) x --target-speedup or faster reaches it "
    "(whole-generation timings vary by a few %).",
)
@click.option(
    "--keep-steps",
    is_flag=True,
    help="Choose only plans that keep --steps sampler steps (skip tables, forecasts, "
    "compositions), for pipelines whose step count is fixed; fewer-steps plans are still scored and reported.",
)
@click.option(
    "--sampler",
    type=click.Choice(["ddim", "dpmpp", "flow"]),
    default=None,
    help="Sampler of the calibration generations and of the plan (dpmpp: DPM-Solver++(2M)); the plan records it "
    "and --steps, so e.g. 25 DPM-Solver++ steps with skips on top is one plan. Default: the model family's own, "
    "not recorded.",
)
@click.option(
    "--reference",
    type=(click.Choice(["ddim", "dpmpp", "flow"]), click.IntRange(min=2)),
    default=None,
    help="SAMPLER STEPS: score every candidate against full compute under this sampler instead of the calibration "
    "sampler's own (e.g. --sampler dpmpp --steps 25 --reference ddim 50: a plan over 25 DPM-Solver++ steps judged "
    "by how close it comes to 50 DDIM steps, as the benches judge it). Costs one more full-compute generation.",
)
def calibrate_steps(
    forecast, forecast_history, compose, compose_forecasts, max_composed, speed_tolerance, keep_steps, sampler,
    reference, out, **common_options,
):  # fmt: skip
    """Whole-step skipping: a timestep-keyed skip table (reuse or fitted forecast, optionally with token or
    block caching composed) or fewer sampler steps, whichever keeps the most PSNR (tcpass.calibrate.steps)."""
    from tcpass.calibrate.steps import calibrate_steps as run
    from tcpass.plan import parse_forecast

    try:
        specs = tuple(dict.fromkeys(parse_forecast(f) for f in compose_forecasts))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--compose-forecast") from e
    model, common = _calibration_setup(sampler=sampler, **common_options)
    if reference is not None:
        click.echo(f"candidates scored against full compute with {reference[1]} {reference[0]} steps")
    report = run(
        model,
        out,
        max_forecast=forecast,
        forecast_histories=tuple(forecast_history),
        compose=tuple(compose),
        compose_forecasts=specs,
        max_composed=max_composed,
        speed_tolerance=speed_tolerance,
        keep_steps=keep_steps,
        sampler=sampler,
        reference=reference,
        **common,
    )
    _echo_report(report, out)


def _batch_sizes(text: str, largest: int) -> tuple[int, ...]:
    """``--batch-sizes`` ("1,2,4") as integers in 1..``largest`` (``--max-batch``)."""
    try:
        sizes = tuple(int(size) for size in text.split(",") if size.strip())
    except ValueError as e:
        raise click.BadParameter(
            f"{text!r}: expected integers separated by commas.", param_hint="'--batch-sizes'"
        ) from e
    if any(not 1 <= size <= largest for size in sizes):
        raise click.BadParameter(
            f"{text!r}: sizes must be in 1..{largest} (--max-batch).", param_hint="'--batch-sizes'"
        )
    return sizes


def _as_options(error: ValueError, config: type) -> str:
    """An error naming ``config``'s dataclass fields, with the fields written as the CLI's options."""
    import re

    names = "|".join(f.name for f in dataclasses.fields(config))
    return re.sub(rf"\b({names})\b", lambda m: "--" + m[1].replace("_", "-"), str(error))


def _serve_until_stopped(address: str | None) -> None:
    """A local instance runs until Ctrl-C or SIGTERM, then shuts Ray down; on a cluster the application stays."""
    if address is not None:
        click.echo(
            "the application keeps running on the cluster; stop it with "
            f"`python -c \"import ray; from ray import serve; ray.init('{address}'); serve.shutdown()\"`."
        )
        return
    import signal
    import sys
    import time

    import ray
    from ray import serve

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the local instance like Ctrl-C
    click.echo("Ctrl-C stops it.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


@main.command("serve")
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="torch: a class-conditional DiT directory (default: the shipped digits model) or a saved text-to-image "
    "pipeline (PixArt, SD3, Flux: the directory with model_index.json); ort: a directory written by "
    "`tcpass export` (required).",
)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    callback=_plan_file,
    default=None,
    help="torch: the plan (default: the shipped digits plan; a pipeline: the default plan); ort: checked against "
    "the export's plan.",
)
@click.option("--runtime", type=click.Choice(["torch", "ort"]), default="torch", show_default=True)
@click.option(
    "--pipeline",
    "pipeline_path",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="ort: the saved PixArt pipeline whose text encoder and VAE run around a text-conditioned export.",
)
@click.option("--height", type=POSITIVE, default=None, help="Text-to-image: image height, pixels (pipeline default).")
@click.option("--width", type=POSITIVE, default=None, help="Text-to-image: image width, pixels (pipeline default).")
@click.option(
    "--max-sequence-length", type=POSITIVE, default=None, help="Text-to-image: prompt tokens (pipeline default)."
)
@click.option("--uncached", is_flag=True, help="torch: serve the untransformed model (full compute), the baseline.")
@click.option(
    "--replicas",
    type=POSITIVE,
    default=None,
    help="Replicas, each holding one model (default 1; not with autoscaling).",
)
@click.option(
    "--min-replicas",
    type=POSITIVE,
    default=None,
    help="Autoscaling: the fewest replicas (default 1; needs --max-replicas).",
)
@click.option(
    "--max-replicas",
    type=POSITIVE,
    default=None,
    help="Autoscale (Ray Serve's autoscaling_config) up to this many replicas.",
)
@click.option(
    "--target-ongoing-requests",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Autoscaling: requests per replica (running or waiting in it) to scale for (default 4: about one batch).",
)
@click.option(
    "--max-batch",
    type=POSITIVE,
    default=None,
    help="Images per model batch (requests are padded to it). torch: default 4; ort: fixed by the export.",
)
@click.option(
    "--batch-sizes",
    default="",
    help="torch: smaller batch sizes to trace too, comma-separated (e.g. 1,2): a batch runs at the smallest "
    "that holds it instead of padding to --max-batch. Faster at low load; a seed's image is then bit-identical "
    "only between requests served at the same size.",
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(min=0),
    default=50.0,
    show_default=True,
    help="How long a batch waits to fill after its first request.",
)
@click.option(
    "--threads", type=POSITIVE, default=1, show_default=True, help="torch / ONNX Runtime threads per replica."
)
@click.option(
    "--replica-cpus",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Ray CPUs reserved per replica (default: --threads).",
)
@click.option(
    "--replica-gpus",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="torch: GPUs reserved per replica (a fraction shares one); the model then runs on CUDA. Untested here.",
)
@click.option(
    "--max-ongoing-requests",
    type=POSITIVE,
    default=8,
    show_default=True,
    help="Requests a replica holds at once, running or waiting for its next batch (>= 2 x --max-batch).",
)
@click.option(
    "--max-queued-requests",
    type=click.IntRange(min=-1),
    default=64,
    show_default=True,
    help="Requests waiting for a replica beyond those; more get 503 with Retry-After. -1: unbounded.",
)
@click.option(
    "--retry-after-s",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="The Retry-After (seconds) sent with a 503.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Times a request whose replica died is sent again, to another replica.",
)
@click.option("--max-steps", type=POSITIVE, default=250, show_default=True, help="Largest `steps` a request may ask.")
@click.option(
    "--address",
    default=None,
    help="Ray cluster to deploy on (ray://head:10001 or auto); default: a new local Ray instance on this machine.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP host (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--request-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="A request not answered by then (waiting, retries and generation) gets 504.",
)
def serve_command(
    model_path, plan_path, runtime, pipeline_path, max_batch, batch_sizes, batch_wait_ms, replica_gpus, address, host,
    port, **options,
) -> None:  # fmt: skip
    """Serve a class-conditional DiT or a text-to-image pipeline over HTTP with Ray Serve: batching, replicas,
    autoscaling, retries when a replica dies, a bounded queue (503) and a deadline (504) (needs the serve extra)."""
    if runtime == "ort" and model_path is None:
        raise click.BadParameter("--runtime ort needs the directory `tcpass export` wrote.", param_hint="'--model'")
    sizes = _batch_sizes(batch_sizes, max_batch or 4)
    try:
        from tcpass.serve import DeployConfig, ServeConfig, start
    except ImportError as e:
        raise click.ClickException(str(e)) from e

    # the options named as DeployConfig's fields configure the deployment, the others the sampler (ServeConfig)
    deploy_names = {f.name for f in dataclasses.fields(DeployConfig)}
    try:
        deploy = DeployConfig(
            replica_gpus=replica_gpus or 0.0, **{k: v for k, v in options.items() if k in deploy_names}
        )
    except ValueError as e:
        raise click.UsageError(_as_options(e, DeployConfig)) from e
    config = ServeConfig(
        model=None if model_path is None else str(model_path.resolve()),
        plan=None if plan_path is None else str(plan_path.resolve()),
        runtime=runtime,
        max_batch=max_batch,
        batch_sizes=sizes,
        batch_wait_s=batch_wait_ms / 1000,
        device="cuda" if replica_gpus else "cpu",
        pipeline=None if pipeline_path is None else str(pipeline_path.resolve()),
        **{k: v for k, v in options.items() if k not in deploy_names},
    )
    try:
        url = start(config, deploy, address, host, port)
    except ValueError as e:
        raise click.ClickException(_as_options(e, DeployConfig)) from e
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"serving at {url}: POST /generate (PNG), POST /generate/json, GET /health")
    _serve_until_stopped(address)


if __name__ == "__main__":
    main()
