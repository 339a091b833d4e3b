"""End to end through diffusers pipelines: pipe.transformer = tcpass.transform(pipe.transformer, plan)."""

import pytest
import torch

import tcpass
from tcpass import CachePlan, StepKind, TPRRSchedule
from tcpass.plan import save_plan
from tests.pipelines import CALL, build
from tests.tolerance import REGROUPED, assert_close

PLAN = CachePlan(keep_ratio=0.25, attention="cached_kv", schedule=TPRRSchedule(boundary_timestep=500, intervals=(2, 3)))


@pytest.fixture(scope="module", params=["pixart_alpha", "pixart_sigma", "sd3", "flux"])
def saved_pipeline(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family)
    build(family).save_pretrained(path)
    return family, path


def generate(pipe, family):
    out = pipe(
        "a photo of a red car",
        height=8,
        width=8,
        num_inference_steps=8,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **CALL[family],
    )
    return out.images


def test_pipeline_generates_with_and_without_caching(saved_pipeline):
    family, path = saved_pipeline
    load = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = type(build(family)).from_pretrained(path, **load)
    want = generate(pipe, family)

    original = pipe.transformer
    pipe.transformer = tcpass.transform(original, CachePlan.no_cache())
    same = generate(pipe, family)
    assert_close(same, want, units=REGROUPED, what="no caching must reproduce the pipeline")

    pipe.transformer = tm = tcpass.transform(original, PLAN)
    cached = generate(pipe, family)
    assert tm.step_counts[StepKind.CACHED] >= 4 and tm.step_counts[StepKind.FULL] >= 2
    assert torch.isfinite(cached).all() and cached.shape == want.shape
    assert 0 < (cached - want).abs().max() < 0.5


def test_generate_command_writes_a_png(tmp_path):
    """The CLI on one family (the API is covered above for all of them)."""
    from click.testing import CliRunner
    from PIL import Image

    from tcpass.cli import main

    path = tmp_path / "sd3"
    build("sd3").save_pretrained(path)
    plan = tmp_path / "plan.json"
    save_plan(PLAN, plan)
    out = tmp_path / "image.png"
    args = ["generate", "--model", str(path), "--prompt", "a red car", "--steps", "6", "--plan", str(plan)]
    result = CliRunner().invoke(main, [*args, "--height", "8", "--width", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (8, 8)
    assert "cached" in result.output

    result = CliRunner().invoke(main, ["generate", "--model", str(path), "-o", str(out)])
    assert result.exit_code != 0 and "--prompt" in result.output


def test_generate_refuses_a_bare_transformer_directory(tmp_path):
    from click.testing import CliRunner

    from tcpass.cli import main

    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path), "--prompt", "a cat"])
    assert result.exit_code != 0 and "model_index.json" in result.output
