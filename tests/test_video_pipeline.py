"""Video pipelines drop-in: a tcpass transformer in a tiny WanPipeline (Wan 2.1 / 2.2) and LTXPipeline (tiny VAE
and text encoder).

The no-cache plan gives the pipeline's frames; the default plan runs CACHED steps with callbacks;
``save_pretrained`` / ``from_pretrained`` round-trips the transformed pipeline; Wan 2.2's two experts
(high noise, then low noise, switched at ``boundary_ratio``) each carry their own plan.
"""

import functools

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import tcpass
from tcpass import CachePlan, StepKind, TPRRSchedule
from tcpass.torch_runtime import TokenCacheTransformer
from tests.pipelines import CALL, build
from tests.tolerance import REGROUPED, assert_close

STEPS = 6
DEFAULT = CachePlan(schedule=TPRRSchedule(intervals=(2, 2)))  # CACHED calls within 6 steps


def _frames(pipe, seed=0, output_type="np", family="wan", **extra) -> np.ndarray:
    out = pipe(
        prompt="a photo of a cat",
        negative_prompt="a dog",
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        **CALL[family],
        **extra,
    )
    return np.asarray(out.frames)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_video_pipeline_no_cache_default_plan_callbacks_and_round_trip(family, tmp_path):
    pipe = build(family)
    frames = functools.partial(_frames, family=family)
    want, want_latents = frames(pipe), frames(pipe, output_type="latent")
    assert want.shape[1] == CALL[family]["num_frames"]
    original = pipe.transformer
    pipe.transformer = tcpass.transform(original, CachePlan.no_cache())
    assert_close(frames(pipe), want, units=REGROUPED, what="no-cache plan")

    pipe.transformer = tm = tcpass.transform(original, DEFAULT)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, tuple(kwargs["latents"].shape)))
        return kwargs

    got = frames(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    assert [i for i, _ in seen] == list(range(STEPS))
    assert tm.step_counts[StepKind.CACHED] > 0 and np.isfinite(got).all()
    # the tiny random VAE barely moves its output; the latents show what caching changed
    assert np.abs(frames(pipe, output_type="latent") - want_latents).max() > 1e-3, "caching must change the latents"

    pipe.save_pretrained(tmp_path)
    again = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(again) is type(pipe)
    assert isinstance(again.transformer, TokenCacheTransformer)
    assert again.transformer.plan.to_dict() == tm.plan.to_dict()
    assert_close(frames(again), got, units=REGROUPED, what="after save/load")


def test_wan22_two_experts_each_carry_their_own_plan():
    frames = _frames
    pipe = build("wan22")
    want = frames(pipe)
    high, low = pipe.transformer, pipe.transformer_2
    pipe.transformer = tcpass.transform(high, CachePlan.no_cache())
    pipe.transformer_2 = tcpass.transform(low, CachePlan.no_cache())
    assert_close(frames(pipe), want, units=REGROUPED, what="no-cache plans on both experts")

    plan_low = CachePlan(keep_ratio=0.5, schedule=TPRRSchedule(boundary_timestep=0, intervals=(2, 2)))
    pipe.transformer = a = tcpass.transform(high, DEFAULT)
    pipe.transformer_2 = b = tcpass.transform(low, plan_low)
    got = frames(pipe)
    assert np.isfinite(got).all()
    calls_a, calls_b = sum(a.step_counts.values()), sum(b.step_counts.values())
    assert calls_a > 0 and calls_b > 0 and calls_a + calls_b == 2 * STEPS  # cond and uncond per step
    assert b.step_counts[StepKind.CACHED] > 0
    assert a.plan.keep_ratio != b.plan.keep_ratio
