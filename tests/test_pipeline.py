"""tcpass.transform drops into diffusers' DiTPipeline, loaded with from_pretrained from a local directory."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

import tcpass
from tcpass import CachePlan, StepKind, TPRRSchedule
from tests.conftest import make_dit
from tests.tolerance import REGROUPED, assert_close


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32,),
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        sample_size=16,
    )
    pipe = DiTPipeline(transformer=make_dit(), vae=vae, scheduler=DDIMScheduler(), id2label={0: "zero", 1: "one"})
    path = tmp_path_factory.mktemp("dit-pipe")
    pipe.save_pretrained(path)
    return path


def generate(pipe, steps=8, guidance=4.0):
    out = pipe(
        class_labels=[0, 1],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images


def test_pipeline_generates_with_transformed_transformer_and_cfg(pipe_dir):
    pipe = DiTPipeline.from_pretrained(pipe_dir)
    reference = generate(pipe)

    pipe.transformer = tcpass.transform(pipe.transformer, CachePlan.no_cache())
    assert_close(generate(pipe), reference, units=REGROUPED)

    plan = CachePlan(keep_ratio=0.25, schedule=TPRRSchedule(boundary_timestep=500, intervals=(3, 2)))
    pipe.transformer = tcpass.transform(pipe.transformer.transformer, plan)
    images = generate(pipe)
    assert images.shape == reference.shape == (2, 16, 16, 3)
    assert np.isfinite(images).all()
    counts = pipe.transformer.step_counts
    assert counts[StepKind.CACHED] > 0 and counts[StepKind.FULL] > 0
    assert counts[StepKind.CACHED] + counts[StepKind.FULL] == 8
    assert np.abs(images - reference).max() > 0
    # the next generation resets the caches by itself: same result again
    assert_close(generate(pipe), images, units=REGROUPED)
