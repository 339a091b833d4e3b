"""Video DiTs (Wan, HunyuanVideo, CogVideoX, LTX-Video): compiled and exported like the image families, on tiny configs.

The golden tests (no-cache plan equals eager, cached steps equal an eager reference, batched rows
independent) run in tests/test_families.py, ``torch.compile`` in tests/test_compile_video.py; here:
the default plan runs, and the ONNX Runtime export equals torch.
"""

import numpy as np
import pytest
import torch

import tcpass
from tcpass import CachePlan, StepKind, TPRRSchedule
from tcpass.export.onnx_export import export_onnx
from tcpass.export.ort_runtime import OrtTokenCacheRuntime
from tcpass.trace import flatten_inputs
from tests.families import MAKERS, family_inputs
from tests.tolerance import OTHER_KERNELS, assert_close

STEPS = (0.9, 0.85, 0.8, 0.75, 0.4, 0.35, 0.3)  # both TPRR phases
PLAN = CachePlan(keep_ratio=0.5, attention="cached_kv", schedule=TPRRSchedule(intervals=(2, 3)))


def generation(model, family, seed):
    """One generation's calls; the latents differ per step (as in sampling: no ties in the selector)."""
    with torch.no_grad():
        return [model(**family_inputs(family, t=t, seed=seed + i), return_dict=False)[0] for i, t in enumerate(STEPS)]


@pytest.fixture(scope="module", params=["wan", "hunyuan", "cogvideox", "ltx"])
def video(request):
    return request.param, MAKERS[request.param]()


def test_the_default_plan_runs_on_a_video_latent(video):
    family, model = video
    tm = tcpass.transform(model, CachePlan())  # traced with the adapter's example video first
    out = generation(tm, family, 0)
    assert out[0].shape == family_inputs(family)["hidden_states"].shape
    assert tm.step_counts[StepKind.CACHED] > 0


def test_exports_to_onnx_runtime_equal_to_torch(video, tmp_path):
    family, model = video
    tm = tcpass.transform(model, PLAN, example_inputs=family_inputs(family))
    export_onnx(tm, tmp_path / family)
    runtime = OrtTokenCacheRuntime(tmp_path / family)
    want = generation(tcpass.transform(model, PLAN, example_inputs=family_inputs(family)), family, 0)
    numbers = {k: v for k, v in family_inputs(family).items() if not isinstance(v, (torch.Tensor, dict))}
    numbers.pop("image_rotary_emb", None)  # CogVideoX's (cos, sin): tensors, flattened below
    for i, t in enumerate(STEPS):
        inputs = family_inputs(family, t=t, seed=i)
        arrays = {k: v.numpy() for k, v in flatten_inputs(inputs).items()}  # CogVideoX: rotary (cos, sin)
        got = runtime(**arrays, **numbers)  # LTX: its latent grid as Python numbers, as the pipeline passes it
        assert_close(got, want[i].numpy(), units=OTHER_KERNELS, what=f"step {i}")
    assert runtime.step_counts[StepKind.CACHED] > 0
    assert np.isfinite(got).all()
    if family == "ltx":  # the grid is baked into the graphs: another one is refused, naming the fix
        with pytest.raises(ValueError, match="'height' = 4: the graphs were exported with 2 baked in"):
            runtime(**arrays, **{**numbers, "height": 4, "width": 2})


def test_ltx_latent_grid_numbers_key_the_graphs():
    """LTX-Video's num_frames/height/width are Python ints baked into a trace: another grid with the same token
    count traces again (its rotary embedding differs) instead of reusing graphs built for the first."""
    model = MAKERS["ltx"]()
    tm = tcpass.transform(model, CachePlan.no_cache(), example_inputs=family_inputs("ltx"))
    wide = family_inputs("ltx")
    tall = {**wide, "height": 4, "width": 2}
    with torch.no_grad():
        got = [tm(**inputs, return_dict=False)[0] for inputs in (wide, tall, wide)]
        want = [model(**inputs, return_dict=False)[0] for inputs in (wide, tall)]
    assert (want[0] - want[1]).abs().max() > 1e-3, "the grid must change the output"
    for g, w, what in zip(got, [*want, want[0]], ("2 x 4", "4 x 2", "2 x 4 again"), strict=True):
        assert_close(g, w, units=OTHER_KERNELS, what=what)
