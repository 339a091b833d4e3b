"""The `tcpass` command line."""

from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tcpass")
def main() -> None:
    """TokenCache for diffusion transformers, as a compiler pass."""


@main.command()
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="DiT directory (default: the shipped reference model).",
)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Plan JSON (default: the reference model's shipped plan).",
)
@click.option("--steps", default=50, show_default=True, help="DDIM steps.")
@click.option("--guidance", default=4.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--per-class", default=1, show_default=True, help="Samples per digit class.")
@click.option("--seed", default=0, show_default=True)
@click.option("--rounds", default=3, show_default=True, help="Timed generations per variant (after a warm-up).")
@click.option("--threads", default=2, show_default=True, help="torch CPU threads.")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("tcpass_demo.png"),
    show_default=True,
    help="Where to write the PNG grid.",
)
def demo(model_dir, plan_path, steps, guidance, per_class, seed, rounds, threads, out) -> None:
    """Full compute vs TokenCache on the shipped reference DiT: speed, fidelity, class accuracy, a PNG."""
    import torch

    from tcpass.zoo.demo import format_table, run_demo, save_grid

    torch.set_num_threads(threads)
    result = run_demo(model_dir, plan_path, steps, guidance, per_class, seed, rounds)
    click.echo(
        f"plan: {result.plan.attention}, keep {result.plan.keep_ratio}, "
        f"intervals {result.plan.schedule.intervals}; {steps} DDIM steps, CFG {guidance}, "
        f"{len(result.labels)} samples, median of {rounds} rounds"
    )
    click.echo(format_table(result))
    click.echo(f"wrote {save_grid(result, out).resolve()}")


if __name__ == "__main__":
    main()
