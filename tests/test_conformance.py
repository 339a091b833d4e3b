"""Drop-in conformance: a diffusers pipeline whose transformer is ``tcpass.transform(...)`` behaves like
the pipeline without it, for DiT, PixArt-alpha, SD3 and Flux tiny pipelines (diffusers-style checks).

- the no-cache plan gives the original pipeline's images;
- the default plan passes every check that does not compare exact pixels (callbacks reading
  latents, progress bar config, attention slicing, batch of one == a batch entry);
- ``save_pretrained`` / ``from_pretrained`` round trip (exact images, original weights in diffusers'
  format, no pickle), and the original class loads the saved transformer;
- dtype conversions (``torch_dtype`` as a dtype or a per-component dict, ``.to(dtype)``) end as they
  do for the untransformed pipeline.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import tcpass
from tcpass import CachePlan, StepKind, TPRRSchedule
from tcpass.torch_runtime import TokenCacheTransformer
from tests.pipelines import CALL, build
from tests.tolerance import OTHER_KERNELS, REGROUPED, assert_close

FAMILIES = ["dit", "pixart_alpha", "sd3", "flux"]
STEPS = 8
# The default plan, but on a cycle short enough for 8 steps to include CACHED calls in both phases.
DEFAULT = CachePlan(schedule=TPRRSchedule(intervals=(2, 2)))
CALL = {**CALL, "dit": {"guidance_scale": 4.0}}
LOAD = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}}


def generate(pipe, family: str, rows: int = 1, first_row: int = 0, **extra) -> np.ndarray:
    """``rows`` images, row i from seed/label/prompt ``first_row + i``, as a numpy array."""
    index = range(first_row, first_row + rows)
    generators = [torch.Generator().manual_seed(i) for i in index]
    if family == "dit":
        conditioning = {"class_labels": list(index)}
    else:
        prompts = ["a photo of a red car", "a blue dog"]
        conditioning = {"prompt": [prompts[i] for i in index], "height": 8, "width": 8}
    out = pipe(
        **conditioning, num_inference_steps=STEPS, generator=generators, output_type="np", **CALL[family], **extra
    )
    return np.asarray(out.images)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, directory of the untransformed pipeline)."""
    family = request.param
    path = tmp_path_factory.mktemp(f"{family}-original")
    build(family).save_pretrained(path)
    return family, path


def load(family, path, **kwargs):
    return DiffusionPipeline.from_pretrained(path, **LOAD.get(family, {}), **kwargs)


def test_no_cache_plan_gives_the_pipelines_images(saved):
    family, path = saved
    pipe = load(family, path)
    want = generate(pipe, family, rows=2)
    pipe.transformer = tcpass.transform(pipe.transformer, CachePlan.no_cache())
    assert_close(generate(pipe, family, rows=2), want, units=REGROUPED)


def test_default_plan_passes_the_pipeline_checks(saved):
    family, path = saved
    pipe = load(family, path)
    original = pipe.transformer
    pipe.transformer = tm = tcpass.transform(original, DEFAULT)

    # attributes pipelines read
    assert tm.config == original.config and tm.dtype == original.dtype and tm.device == original.device
    assert pipe.dtype == original.dtype and pipe.device == original.device

    # callbacks that read latents run at every step and see the cached steps' latents
    # (each pipeline's own callback API; DiTPipeline has none, there the same run goes without one)
    seen = []

    def on_step_end(p, i, t, kwargs):
        seen.append((i, kwargs["latents"].clone(), tm.last_step.kind))
        return kwargs

    def legacy_callback(i, t, latents):
        seen.append((i, latents.clone(), tm.last_step.kind))

    hooks = {
        "dit": {},
        "pixart_alpha": {"callback": legacy_callback, "callback_steps": 1},
    }.get(family, {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]})
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, family, rows=2, **hooks)
    if hooks:
        assert [i for i, *_ in seen] == list(range(STEPS))
        assert {kind for *_, kind in seen} == {StepKind.FULL, StepKind.CACHED}
        assert all(torch.isfinite(latents).all() for _, latents, _ in seen)
    assert images.shape[0] == 2 and np.isfinite(images).all()
    assert tm.step_counts[StepKind.CACHED] > 0

    # attention slicing is a pipeline-level switch: same images with it on
    pipe.enable_attention_slicing()
    assert_close(generate(pipe, family, rows=2), images, units=REGROUPED)
    pipe.disable_attention_slicing()

    # a batch of one equals the same entry of a batch of two (rows are independent under caching)
    alone = generate(pipe, family, rows=1, first_row=1)
    assert_close(alone[0], images[1], units=OTHER_KERNELS)


def test_save_load_round_trip_gives_the_same_images(saved, tmp_path):
    family, path = saved
    pipe = load(family, path)
    original_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.transformer = tcpass.transform(pipe.transformer, DEFAULT)
    want = generate(pipe, family, rows=2)

    pipe.save_pretrained(tmp_path)
    files = sorted(p.name for p in (tmp_path / "transformer").iterdir())
    assert "tcpass.json" in files and "tcpass_plan.json" in files and "config.json" in files
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")], "no pickle"

    again = load(family, tmp_path)
    assert isinstance(again.transformer, TokenCacheTransformer)
    assert again.transformer.plan.to_dict() == pipe.transformer.plan.to_dict()
    assert_close(generate(again, family, rows=2), want, units=REGROUPED)
    assert again.transformer.step_counts[StepKind.CACHED] > 0

    # the weights are the original model's, in diffusers' own format: its class loads them
    cls = type(pipe.transformer.transformer)
    plain = cls.from_pretrained(tmp_path, subfolder="transformer")
    assert type(plain) is cls
    for name, value in plain.state_dict().items():
        assert torch.equal(value, original_state[name]), name


def test_dtype_conversions_end_as_for_the_untransformed_pipeline(saved, tmp_path):
    """``torch_dtype`` at load (a dtype or a per-component dict) and ``.to(dtype)``: the transformed
    pipeline gets the same dtypes and the same outcome (images within bf16 rounding, or the same error)."""
    family, path = saved
    pipe = load(family, path)
    pipe.transformer = tcpass.transform(pipe.transformer, CachePlan.no_cache())
    pipe.save_pretrained(tmp_path)
    for dtype in (torch.bfloat16, {"transformer": torch.bfloat16, "default": torch.float32}):
        plain, ours = load(family, path, torch_dtype=dtype), load(family, tmp_path, torch_dtype=dtype)
        assert ours.transformer.dtype == plain.transformer.dtype  # (diffusers keeps the tiny SD3 in fp32)
        assert ours.vae.dtype == plain.vae.dtype
        outcomes = []
        for p in (plain, ours):
            try:
                outcomes.append(generate(p, family))
            except Exception as e:  # noqa: BLE001 - the point is to compare outcomes
                outcomes.append(type(e))
        if isinstance(outcomes[0], np.ndarray):
            assert isinstance(outcomes[1], np.ndarray), outcomes[1]
            assert_close(outcomes[0], outcomes[1], units=REGROUPED, dtype=torch.bfloat16)
        else:
            assert outcomes[1] is outcomes[0]

    # .to(dtype) after transform: the graphs are re-traced for the new dtype
    plain, ours = load(family, path), load(family, tmp_path)
    for p in (plain, ours):
        p.to(torch.bfloat16)
    assert ours.transformer.dtype == torch.bfloat16 == ours.transformer.transformer.dtype
    a, b = generate(plain, family), generate(ours, family)
    assert_close(a, b, units=REGROUPED, dtype=torch.bfloat16)


def test_changes_that_would_not_reach_the_graphs_are_refused(dit):
    """(What does reach them, re-traced, is tested in tests/test_changes.py.)"""
    tm = tcpass.transform(dit, DEFAULT)
    for call in (
        lambda: tm.enable_layerwise_casting(),
        lambda: tm.enable_group_offload("cpu"),
        lambda: tm.enable_xformers_memory_efficient_attention(),
    ):
        with pytest.raises(NotImplementedError, match="not supported after `tcpass.transform`"):
            call()
    with pytest.raises(NotImplementedError, match="inference-only"):
        tm.enable_gradient_checkpointing()


def test_loading_needs_tcpass_imported_and_says_so(tmp_path):
    """Without tcpass imported, diffusers refuses by name (it never imports a module a repo names)."""
    pipe = build("dit")
    pipe.transformer = tcpass.transform(pipe.transformer, DEFAULT)
    pipe.save_pretrained(tmp_path)
    code = f"import diffusers; diffusers.DiffusionPipeline.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "import tcpass.torch_runtime" in result.stderr


def test_a_directory_without_a_saved_plan_is_refused(tmp_path, dit):
    dit.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tcpass.json"):
        TokenCacheTransformer.from_pretrained(tmp_path)
    (tmp_path / "tcpass.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="format = 99"):
        TokenCacheTransformer.from_pretrained(tmp_path)


def test_generate_command_runs_a_saved_transformed_pipeline(tmp_path):
    from click.testing import CliRunner

    from tcpass.cli import main

    pipe = build("dit")
    pipe.transformer = tcpass.transform(pipe.transformer, DEFAULT)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "image.png"
    args = ["generate", "--model", str(tmp_path / "pipe"), "--class-label", "1", "--steps", "8", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "cached" in result.output


def test_transforming_a_transformed_model_is_refused(dit):
    tm = tcpass.transform(dit, DEFAULT)
    with pytest.raises(TypeError, match="already transformed"):
        tcpass.transform(tm, CachePlan.no_cache())


def test_a_plan_with_a_selector_file_round_trips(dit, tmp_path):
    """The selector's file is copied next to the saved plan with its sha256; a tampered copy is refused."""
    from tcpass import SelectorSpec
    from tcpass.selectors import StaticScoreSelector
    from tests.conftest import dit_inputs

    scores = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(3))
    table = StaticScoreSelector(scores, torch.tensor([900.0, 500.0]), torch.tensor([0, 1, 2]))
    (tmp_path / "plans").mkdir()
    digest = table.save(tmp_path / "plans" / "scores.safetensors")
    selector = SelectorSpec(kind="static", path="scores.safetensors", sha256=digest)  # relative to plan_dir
    plan = CachePlan(schedule=TPRRSchedule(intervals=(2, 2)), selector=selector)
    tm = tcpass.transform(dit, plan, plan_dir=tmp_path / "plans")

    def run(model):
        inputs = dit_inputs()
        return [model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)}).sample for t in (900, 700, 500)]

    want = run(tm)
    tm.save_pretrained(tmp_path / "saved")
    again = TokenCacheTransformer.from_pretrained(tmp_path / "saved")
    assert again.plan.selector.kind == "static" and not again.step_counts
    for got, ref in zip(run(again), want, strict=True):
        assert_close(got, ref, units=REGROUPED)
    assert again.step_counts[StepKind.CACHED] == 1

    copied = tmp_path / "saved" / "tcpass_selector.safetensors"
    copied.write_bytes(copied.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        TokenCacheTransformer.from_pretrained(tmp_path / "saved")


def test_variants_round_trip(tmp_path):
    pipe = build("dit")
    pipe.transformer = tcpass.transform(pipe.transformer, DEFAULT)
    want = generate(pipe, "dit")
    pipe.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    again = DiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    assert isinstance(again.transformer, TokenCacheTransformer)
    assert_close(generate(again, "dit"), want, units=REGROUPED)
