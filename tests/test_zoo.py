"""The shipped reference model and its evaluator."""

import pytest
import torch

import tcpass
from tcpass.metrics import class_accuracy
from tcpass.sampling import ddim_sample, ddim_timesteps
from tcpass.schedule import StepKind, simulate
from tcpass.zoo import (
    NULL_LABEL,
    digits_split,
    load_classifier,
    load_reference_model,
    reference,
    reference_model_dir,
)
from tcpass.zoo.demo import format_table, run_demo, save_grid


def test_shipped_weights_are_safetensors_under_20_mb():
    files = list(reference_model_dir().iterdir())
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == 1 and not any(f.suffix in (".bin", ".pt", ".pkl") for f in files)
    assert weights[0].stat().st_size <= 20 * 2**20


def test_shipped_model_generates_deterministically_for_a_seed():
    model = load_reference_model()
    assert model.config.sample_size // model.config.patch_size == 16  # 256 tokens per image

    def sample(seed):
        noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
        return ddim_sample(model, noise, torch.tensor([3, 7]), NULL_LABEL, num_steps=5, guidance_scale=4.0)

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1
    assert a.shape == (2, 1, 32, 32) and torch.isfinite(a).all()


def test_classifier_is_accurate_on_held_out_digits():
    _, _, images, labels = digits_split()
    assert len(images) == 400
    assert class_accuracy(images, labels, load_classifier()) >= 0.95


def test_shipped_plan_loads_and_fits_the_model():
    plan = tcpass.load_plan(reference("digits").default_plan)
    graphs = tcpass.transform(load_reference_model(), plan).step_graphs()
    assert graphs.blocks == tuple(range(8)) and graphs.num_tokens == 256
    assert {b: k for b, k in graphs.cached[0].keep.items()} == {b: 64 for b in range(8)}


def test_demo_runs_end_to_end(tmp_path, capsys):
    result = run_demo(steps=4, rounds=1, progress=True)
    progress = capsys.readouterr().err  # the bar says what runs: warm-up, then timed rounds, each variant
    for phase in ("warm-up", "timed round 1/1"):
        assert f"{phase}: full compute" in progress and f"{phase}: tcpass" in progress
    assert result.full_images.shape == result.cached_images.shape == (10, 1, 32, 32)
    assert len(result.psnr_db) == 10 and (result.ssim <= 1).all()
    assert "tcpass" in format_table(result)
    path = save_grid(result, tmp_path / "grid.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("name", ["digits", "emoji"])
def test_the_demo_plan_is_the_calibrated_forecast_plan_and_fits_the_model(name):
    from tcpass.zoo.demo import describe_plan

    ref = reference(name)
    plan = tcpass.load_plan(ref.demo_plan)
    assert plan.notes["calibrated_by"] == "tcpass calibrate --policy steps" and plan.skip.weights is not None
    assert plan.model is not None  # made for this model: transform checks the fingerprint
    skipped = [s.kind for s in simulate(plan.schedule, ddim_timesteps(50), plan.skip)].count(StepKind.SKIP)
    assert skipped == len(plan.skip.timesteps) >= 20  # the demo's 50 steps are the calibration's
    text = describe_plan(plan, 50)
    assert f"{skipped} skipped (block-stack residual forecast from the last {plan.skip.history} computed)" in text
    assert text.endswith(f"{50 - skipped} full")
    tm = tcpass.transform(ref.load_model(None), plan)
    assert tm.step_graphs().skip is not None


def test_model_loads_print_no_install_accelerate_notice(tmp_path):
    import logging

    from tcpass.adapters import load_transformer
    from tcpass.generate import load_pipeline
    from tests.conftest import make_dit
    from tests.pipelines import build

    make_dit().save_pretrained(tmp_path / "dit")
    build("dit").save_pretrained(tmp_path / "pipe")
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    diffusers_log = logging.getLogger("diffusers")  # its own handler, no propagation: capture fixtures miss it
    diffusers_log.addHandler(handler)
    try:
        load_reference_model()
        load_transformer(tmp_path / "dit")
        load_pipeline(tmp_path / "pipe")
    finally:
        diffusers_log.removeHandler(handler)
    assert not [m for m in messages if "accelerate" in m]


def test_default_demo_and_generate_outputs_are_git_ignored():
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("tcpass_demo.png", "tcpass.png", "bench/tcpass_demo.png"):
        result = subprocess.run(["git", "check-ignore", "-q", name], cwd=root)
        assert result.returncode == 0, f"{name} is not git-ignored"
