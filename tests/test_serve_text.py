"""`tcpass serve`'s text-to-image samplers without Ray: tiny PixArt and SD3 pipelines (torch), a tiny PixArt
export with its pipeline's text encoder and VAE (ONNX Runtime), and the request checks for either kind of model.
The HTTP path of a text pipeline is in tests/test_serve.py (it shares that module's Ray instance)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tcpass
from tcpass.export.onnx_export import export_onnx
from tcpass.export.ort_runtime import OrtTokenCacheRuntime, generate
from tcpass.noise import seeded_noise
from tcpass.schedule import StepKind
from tcpass.serve import (
    GenerateRequest,
    Job,
    OrtPipelineSampler,
    PipelineSampler,
    ServeConfig,
    _check_request,
    make_sampler,
    request_steps,
    run_batch,
)
from tests.pipelines import CALL, build
from tests.tolerance import OTHER_KERNELS, assert_close

STEPS = 4
PLAN = tcpass.CachePlan(keep_ratio=0.5, schedule=tcpass.TPRRSchedule(intervals=(2, 2)))


def save_pipeline(family: str, root: Path) -> Path:
    build(family).save_pretrained(root / family)
    tcpass.save_plan(PLAN, root / "plan.json")
    return root / family


def direct(family: str, path: Path, prompts, negatives, seeds, guidance=4.0) -> np.ndarray:
    """The pipeline called here, its transformer transformed with `PLAN`: images [n, 3, H, W] in [-1, 1]."""
    from tcpass.generate import load_pipeline

    pipe = load_pipeline(path)
    pipe.transformer = tcpass.transform(pipe.transformer, PLAN)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in CALL[family].items() if k != "guidance_scale"}
    out = pipe(
        prompt=prompts,
        negative_prompt=negatives,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        height=8,
        width=8,
        output_type="np",
        **kwargs,
    )
    assert pipe.transformer.step_counts[StepKind.CACHED] > 0  # the plan caches at these steps
    return np.moveaxis(out.images, -1, 1) * 2 - 1


def text_job(prompt: str, seed: int, negative: str = "", guidance: float = 4.0, images: int = 1) -> Job:
    return Job(None, seed, STEPS, guidance, images, prompt=prompt, negative_prompt=negative)


@pytest.mark.parametrize("family", ["pixart_alpha", "sd3"])
def test_a_text_pipeline_serves_each_prompt_s_image_as_the_pipeline_generates_it(family, tmp_path):
    path = save_pipeline(family, tmp_path)
    length = CALL[family]["max_sequence_length"]
    plan = str(tmp_path / "plan.json")
    sampler = make_sampler(ServeConfig(str(path), plan, max_batch=2, height=8, width=8, max_sequence_length=length))
    assert isinstance(sampler, PipelineSampler) and sampler.image_shape == (3, 8, 8)
    jobs = [text_job("a red car", 3, negative="blue"), text_job("a photo of a dog", 8)]
    results = run_batch(sampler, jobs)
    want = direct(family, path, ["a red car", "a photo of a dog"], ["blue", ""], [3, 8])
    for result, image in zip(results, want, strict=True):
        assert_close(result.samples[0], image, units=OTHER_KERNELS)
    # the second job alone, in the first row beside a padding row: the same image (rows are independent)
    [alone] = run_batch(sampler, [jobs[1]])
    assert alone.batch == {"requests": 1, "images": 1, "padding": 1}
    assert_close(alone.samples[0], results[1].samples[0], units=OTHER_KERNELS)
    # what each request asks is read: another negative prompt, another seed give other images
    [other_negative] = run_batch(sampler, [text_job("a red car", 3)])
    [other_seed] = run_batch(sampler, [text_job("a red car", 4, negative="blue")])
    for other in (other_negative, other_seed):
        assert np.abs(other.samples - results[0].samples).max() > 1e-3
    # requests with other guidance run as their own model batch
    mixed = run_batch(sampler, [text_job("a red car", 3, negative="blue"), text_job("a cat", 1, guidance=2.0)])
    assert [r.batch["requests"] for r in mixed] == [1, 1]
    assert_close(mixed[0].samples, results[0].samples, units=OTHER_KERNELS)


def test_a_pixart_export_is_served_with_its_pipeline_s_text_encoder_and_vae(tmp_path):
    """ONNX Runtime: the export (2 images with CFG, 12 prompt tokens) equals its numpy sampler run here on the
    pipeline's prompt embeddings, decoded by the pipeline's VAE."""
    from tcpass.generate import load_pipeline

    path = save_pipeline("pixart_alpha", tmp_path)
    pipe = load_pipeline(path)
    example = {
        "hidden_states": torch.zeros(4, 4, 8, 8),
        "encoder_hidden_states": torch.zeros(4, 12, 24),
        "timestep": torch.zeros(4, dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "encoder_attention_mask": torch.ones(4, 12),
    }
    export_onnx(tcpass.transform(pipe.transformer, PLAN, example_inputs=example), tmp_path / "onnx")
    config = ServeConfig(model=str(tmp_path / "onnx"), runtime="ort", pipeline=str(path))
    sampler = make_sampler(config)
    assert isinstance(sampler, OrtPipelineSampler) and (sampler.max_batch, sampler.image_shape) == (2, (3, 8, 8))
    [result] = run_batch(sampler, [text_job("a red car", 5, negative="blue")])

    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            ["a red car", ""], negative_prompt=["blue", ""], device="cpu", max_sequence_length=12
        )
    runtime = OrtTokenCacheRuntime(tmp_path / "onnx")
    latents = generate(
        runtime,
        seeded_noise([5, 0], (4, 8, 8)),
        {"encoder_hidden_states": embeds.numpy(), "encoder_attention_mask": mask.numpy()},
        num_steps=STEPS,
        uncond={"encoder_hidden_states": negative.numpy(), "encoder_attention_mask": negative_mask.numpy()},
    )
    assert runtime.step_counts[StepKind.CACHED] > 0
    with torch.no_grad():
        want = pipe.vae.decode(torch.from_numpy(latents) / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert_close(result.samples[0], want[0].numpy(), units=OTHER_KERNELS)
    [other] = run_batch(sampler, [text_job("a red car", 5)])  # the negative prompt is read
    assert np.abs(other.samples - result.samples).max() > 1e-3


def test_samplers_refuse_what_they_cannot_serve_naming_the_option(tmp_path):
    dit = save_pipeline("dit", tmp_path)
    with pytest.raises(ValueError, match="DiTPipeline is a class-conditional DiT pipeline; tcpass serve serves"):
        make_sampler(ServeConfig(model=str(dit)))
    with pytest.raises(ValueError, match="--pipeline is for --runtime ort"):
        make_sampler(ServeConfig(model=str(dit), pipeline=str(dit)))
    with pytest.raises(ValueError, match="--height, --width and --max-sequence-length are for text-to-image"):
        make_sampler(ServeConfig(height=64))


TEXT_MODEL = {"conditioning": "text", "pipeline": "PixArtAlphaPipeline", "num_classes": None, "max_steps": 50}
CLASS_MODEL = {"conditioning": "class", "pipeline": None, "num_classes": 10, "max_steps": 50}


@pytest.mark.parametrize(
    ("model", "body", "field", "message"),
    [
        (TEXT_MODEL, {"seed": 1}, "prompt", "prompt: required by this server's text-to-image model"),
        (TEXT_MODEL, {"prompt": "a", "class_label": 3}, "class_label", "takes a prompt, not a class label"),
        (CLASS_MODEL, {"seed": 1}, "class_label", "class_label: required by this class-conditional model (0..9)"),
        (CLASS_MODEL, {"class_label": 1, "prompt": "a"}, "prompt", "model is class-conditional; send class_label"),
        (CLASS_MODEL, {"class_label": 1, "negative_prompt": "a"}, "negative_prompt", "send class_label"),
        (CLASS_MODEL, {"class_label": 10}, "class_label", "10 is not a class of this model (0..9)"),
    ],
)
def test_a_request_is_checked_against_the_kind_of_model_served(model, body, field, message):
    answer = _check_request(GenerateRequest(**body), {**model, "max_batch": 4})
    assert answer.status_code == 422
    content = json.loads(answer.body)
    assert content["fields"] == [field] and message in content["error"]


def test_a_plan_s_sampler_steps_are_the_default_and_other_step_counts_are_refused_naming_them():
    plan = {"sampler": "dpmpp", "sampler_steps": 12, "sampler_timesteps": list(range(999, 0, -83))}
    model = {**CLASS_MODEL, "max_batch": 4, "plan": plan}
    assert request_steps(GenerateRequest(class_label=1), model) == 12
    assert request_steps(GenerateRequest(class_label=1), {**model, "plan": None}) == 50
    assert request_steps(GenerateRequest(class_label=1, steps=7), {**model, "plan": None}) == 7
    assert _check_request(GenerateRequest(class_label=1), model) is None
    assert _check_request(GenerateRequest(class_label=1, steps=12), model) is None
    answer = _check_request(GenerateRequest(class_label=1, steps=50), model)
    content = json.loads(answer.body)
    assert answer.status_code == 422 and content["fields"] == ["steps"]
    assert "runs 12 dpmpp steps" in content["error"] and "send steps=12" in content["error"]


def test_valid_requests_of_either_kind_pass():
    assert _check_request(GenerateRequest(prompt="a cat"), {**TEXT_MODEL, "max_batch": 4}) is None
    assert _check_request(GenerateRequest(class_label=9), {**CLASS_MODEL, "max_batch": 4}) is None
