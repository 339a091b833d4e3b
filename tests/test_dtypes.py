"""Half precision: bfloat16 and float16 models, golden tests with dtype-aware tolerances.

The graphs run the model's own arithmetic in its dtype (caches, gathers, the Cache Predictor and
attention included); the independent reference (tests/reference.py) runs the eager diffusers model in
the same dtype. Tolerances are a few units of the dtype's eps relative to the output's scale: a wrong
token, a wrong cache or a silent upcast is orders of magnitude above them.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import tcpass
from tcpass import CachePlan, SelectorSpec, StepKind, StepSkip, TPRRSchedule
from tcpass.sampling import ddim_sample, ddim_timesteps
from tests.conftest import dit_inputs, make_dit
from tests.reference import ReferenceTokenCache, dynamic_predictor_reference, topk_input_change
from tests.tolerance import assert_close

HALF = [torch.bfloat16, torch.float16]
TIMESTEPS = (900, 800, 700)
ALL_PHASE0 = TPRRSchedule(boundary_timestep=0, intervals=(3, 3))


def half_dit(dtype, **kw):
    return make_dit(**kw).to(dtype)


def half_inputs(dtype, **kw):
    inputs = dit_inputs(**kw)
    return {**inputs, "hidden_states": inputs["hidden_states"].to(dtype)}


def run(model, inputs):
    with torch.no_grad():
        return [model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)}).sample for t in TIMESTEPS]


def assert_within_eps(got, want, dtype, units=4, what=""):
    """|got - want| <= units * eps(dtype) * max|want| (and the same dtype)."""
    assert got.dtype == want.dtype == dtype, what
    assert_close(got, want, units=units, what=what)


@pytest.mark.parametrize("dtype", HALF)
def test_no_cache_plan_equals_eager(dtype):
    model, inputs = half_dit(dtype), half_inputs(dtype)
    got = run(tcpass.transform(model, CachePlan.no_cache(), example_inputs=inputs), inputs)
    for i, (g, w) in enumerate(zip(got, run(model, inputs), strict=True)):
        assert_within_eps(g, w, dtype, units=1, what=f"step {i}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("attention", ["full_kv", "cached_kv", "kept_only"])
def test_cached_steps_match_reference_input_change(dtype, attention):
    model, inputs = half_dit(dtype), half_inputs(dtype)
    blocks = (1, 2)
    plan = CachePlan(blocks=blocks, keep_ratio=0.25, attention=attention, schedule=ALL_PHASE0)
    tm = tcpass.transform(model, plan, example_inputs=inputs)
    got = run(tm, inputs)
    assert tm.step_counts[StepKind.CACHED] == 2
    ref = ReferenceTokenCache(copy.deepcopy(model), blocks, attention, topk_input_change(16))
    for i, t in enumerate(TIMESTEPS):
        want = ref({**inputs, "timestep": torch.full_like(inputs["timestep"], t)}, full=(i == 0))
        assert_within_eps(got[i], want, dtype, what=f"step {i}")
    assert (got[2].float() - run(model, inputs)[2].float()).abs().max() > 1e-2, "caching must change the output"


@pytest.mark.parametrize("dtype", HALF)
def test_cached_steps_match_reference_toca(dtype):
    model, inputs = half_dit(dtype), half_inputs(dtype)
    blocks = (0, 2)
    plan = CachePlan(blocks=blocks, keep_ratio=0.25, schedule=ALL_PHASE0, selector=SelectorSpec(kind="toca"))
    tm = tcpass.transform(model, plan, example_inputs=inputs)
    got = run(tm, inputs)
    assert all(c.dtype == dtype for c in tm.step_graphs().caches), "the score cache too is in the model's dtype"
    ref = ReferenceTokenCache(
        copy.deepcopy(model), blocks, "full_kv", lambda b, x, st: st["score"].topk(16, dim=1).indices, toca=True
    )
    for i, t in enumerate(TIMESTEPS):
        want = ref({**inputs, "timestep": torch.full_like(inputs["timestep"], t)}, full=(i == 0))
        assert_within_eps(got[i], want, dtype, what=f"step {i}")


@pytest.mark.parametrize("dtype", HALF)
def test_dynamic_predictor_runs_in_the_model_dtype_and_matches_reference(dtype, tmp_path):
    from tcpass.predictor import DynamicPredictor, save_predictor

    torch.manual_seed(5)
    predictor = DynamicPredictor(hidden_size=32, num_blocks=3, width=8)
    torch.nn.init.normal_(predictor.out.weight)
    torch.nn.init.normal_(predictor.gain)
    digest = save_predictor(predictor, tmp_path / "predictor.safetensors")  # saved in float32
    blocks = (1, 2)
    plan = CachePlan(
        blocks=blocks,
        keep_ratio=0.25,
        attention="cached_kv",
        schedule=ALL_PHASE0,
        selector=SelectorSpec(kind="dynamic", path=str(tmp_path / "predictor.safetensors"), sha256=digest),
    )
    model, base = half_dit(dtype), half_inputs(dtype)
    drift = torch.randn(base["hidden_states"].shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    steps = [
        {
            **base,
            "hidden_states": base["hidden_states"] + 0.3 * i * drift,
            "timestep": torch.full_like(base["timestep"], t),
        }
        for i, t in enumerate(TIMESTEPS)
    ]
    tm = tcpass.transform(model, plan, example_inputs=base)
    graphs = tm.step_graphs()
    weights = dict(graphs.cached[0].gm.named_parameters())
    predictor_weights = {n: w.dtype for n, w in weights.items() if n.startswith("tc_predictor.")}
    assert len(predictor_weights) == len(list(predictor.parameters()))
    assert set(predictor_weights.values()) == {dtype}, "the predictor runs in the model's dtype, in the graph"
    assert {c.dtype for c in graphs.caches} == {dtype}, "caches (predictor.input included) in the model's dtype"
    with torch.no_grad():
        got = [tm(**step).sample for step in steps]

    # Independent: the float32 predictor cast to the model's dtype, applied eagerly to block 0's input.
    half = copy.deepcopy(predictor).to(dtype)
    reference = dynamic_predictor_reference(copy.deepcopy(model), half, blocks, "cached_kv", 16)
    for i, step in enumerate(steps):
        want = reference(step, full=(i == 0))
        assert_within_eps(got[i], want, dtype, what=f"step {i}")


@pytest.mark.parametrize("dtype", HALF)
def test_whole_block_reuse_and_static_scores_match_reference(dtype, tmp_path):
    from tcpass.selectors import StaticScoreSelector

    model, inputs = half_dit(dtype), half_inputs(dtype)
    scores = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))  # float32 table, 2 blocks
    table = StaticScoreSelector(scores, torch.tensor([900.0, 800.0, 700.0]), torch.tensor([0, 1]))
    digest = table.save(tmp_path / "scores.safetensors")
    plan = CachePlan(
        blocks=(0, 1),
        keep_ratio=0.25,
        block_keep_ratio={1: 0.0},  # block 1: whole-block reuse
        schedule=ALL_PHASE0,
        selector=SelectorSpec(kind="static", path=str(tmp_path / "scores.safetensors"), sha256=digest),
    )
    got = run(tcpass.transform(model, plan, example_inputs=inputs), inputs)
    step = {"i": 0}

    def select(b, x, _state):
        return None if b == 1 else scores[0, step["i"]].topk(16).indices.expand(x.shape[0], 16)

    ref = ReferenceTokenCache(copy.deepcopy(model), (0, 1), "full_kv", select)
    for i, t in enumerate(TIMESTEPS):
        step["i"] = i
        want = ref({**inputs, "timestep": torch.full_like(inputs["timestep"], t)}, full=(i == 0))
        assert_within_eps(got[i], want, dtype, what=f"step {i}")


@pytest.mark.parametrize("dtype", HALF)
def test_skipped_steps_match_reference(dtype):
    """SKIP steps scale the stack residual in the model's dtype; reference: hooks on the eager model."""
    from tests.test_skip import SkipReference

    ts = ddim_timesteps(8)
    skip = StepSkip(timesteps=[ts[2], ts[4], ts[5]], scales=[1.0, 0.9, 1.1], level="stack")
    model = half_dit(dtype)
    tm = tcpass.transform(model, CachePlan(blocks=(), skip=skip), example_inputs=half_inputs(dtype))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    labels = torch.tensor([1, 2])
    got = ddim_sample(tm, noise, labels, null_label=1000, num_steps=8)
    want = ddim_sample(SkipReference(copy.deepcopy(model), skip), noise, labels, null_label=1000, num_steps=8)
    assert tm.step_counts[StepKind.SKIP] == 3
    assert tm.step_graphs().skip is not None and all(c.dtype == dtype for c in tm.step_graphs().caches)
    assert_within_eps(got, want, dtype, what="8-step generation")


@pytest.mark.parametrize("dtype", HALF)
def test_batch_rows_are_independent(dtype):
    model = half_dit(dtype)
    plan = CachePlan(keep_ratio=0.25, schedule=ALL_PHASE0)
    three = half_inputs(dtype, batch=3)
    got = run(tcpass.transform(model, plan, example_inputs=three), three)
    one = {k: v[1:2] for k, v in three.items()}
    alone = run(tcpass.transform(model, plan, example_inputs=one), one)
    for i in range(3):
        assert_within_eps(got[i][1:2], alone[i], dtype, units=2, what=f"step {i}")


def test_unsupported_dtype_is_refused_naming_it_and_the_fix():
    model = make_dit().to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"float8_e4m3fn weights.*model\.to\(torch\.bfloat16\)"):
        tcpass.transform(model, CachePlan())
    assert all(p.dtype == torch.float8_e4m3fn for p in model.parameters())


def test_inductor_compiles_a_bfloat16_model_once_and_matches_eager():
    """Part of the GPU path testable on CPU: bfloat16 graphs compile fullgraph, with no recompilation over
    two generations, and equal the eager transformed model within bfloat16 tolerance."""
    torch._dynamo.reset()
    counters.clear()
    model = half_dit(torch.bfloat16, num_layers=2)
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv", schedule=TPRRSchedule(boundary_timestep=500))
    compiled = tcpass.transform(model, plan, backend="inductor")
    eager = tcpass.transform(model, plan)
    labels = torch.tensor([1, 2])
    outs = []
    for seed in (0, 1):
        noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
        with torch._dynamo.config.patch(error_on_recompile=seed == 1):
            got = ddim_sample(compiled, noise, labels, null_label=1000, num_steps=10)
        want = ddim_sample(eager, noise, labels, null_label=1000, num_steps=10)
        outs.append(got)
        assert_close(got, want, units=8, dtype=torch.bfloat16, what=f"generation {seed}")  # float32 samples
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # FULL and CACHED, compiled once
    assert compiled.step_counts[StepKind.CACHED] > 0
    assert not torch.equal(outs[0], outs[1])


# ONNX: float16 exports and runs on ONNX Runtime; bfloat16 is refused before anything is written.


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    from tcpass.export.onnx_export import export_onnx

    model = make_dit().to(torch.float16)
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv")
    out = tmp_path_factory.mktemp("fp16") / "onnx"
    export_onnx(tcpass.transform(model, plan, example_inputs=half_inputs(torch.float16)), out, null_label=1000)
    return model, plan, out


def test_float16_export_matches_eager_every_step(fp16_export):
    from tcpass.export.ort_runtime import OrtTokenCacheRuntime

    model, plan, out = fp16_export
    runtime = OrtTokenCacheRuntime(out)
    assert runtime.input_dtype("hidden_states") == np.float16
    eager = tcpass.transform(model, plan, example_inputs=half_inputs(torch.float16))
    g = torch.Generator().manual_seed(0)
    for t in ddim_timesteps(8):
        inputs = {
            "hidden_states": torch.randn(2, 4, 16, 16, generator=g).to(torch.float16),
            "timestep": torch.full((2,), int(t)),
            "class_labels": torch.tensor([3, 1000]),
        }
        with torch.no_grad():
            want = eager(**inputs).sample
        got = runtime(**{k: v.numpy() for k, v in inputs.items()})
        assert got.dtype == np.float16
        # ORT and torch accumulate float16 matmuls differently: a few eps at the output's scale
        assert_within_eps(torch.from_numpy(got), want, torch.float16, units=8, what=f"t={t}")
    assert runtime.step_counts[StepKind.CACHED] > 0 and runtime.step_counts[StepKind.FULL] > 0


def test_float16_generation_on_onnx_runtime_matches_torch(fp16_export):
    from tcpass.export.ort_runtime import OrtTokenCacheRuntime, generate

    model, plan, out = fp16_export
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    tm = tcpass.transform(model, plan, example_inputs=half_inputs(torch.float16))
    want = ddim_sample(tm, noise, torch.tensor([4]), 1000, 20, 4.0).numpy()
    got = generate(OrtTokenCacheRuntime(out), noise.numpy(), np.array([4]), 20, 4.0)
    assert got.dtype == np.float32
    psnr = 10 * math.log10((want.max() - want.min()) ** 2 / np.mean((got - want) ** 2))
    assert psnr >= 40, f"{psnr:.1f} dB"


def test_bfloat16_export_is_refused_before_anything_is_written(tmp_path):
    from tcpass.export.onnx_export import export_onnx

    model = make_dit().to(torch.bfloat16)
    tm = tcpass.transform(model, CachePlan(keep_ratio=0.25), example_inputs=half_inputs(torch.bfloat16))
    with pytest.raises(TypeError, match=r"bfloat16.*model\.to\(torch\.float16\)"):
        export_onnx(tm, tmp_path / "onnx", null_label=1000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generate_command_runs_a_half_precision_pipeline(tmp_path, dtype):
    """`tcpass generate --dtype` end to end on a tiny DiT pipeline: the same PNG as the pipeline loaded
    in that dtype and run through the API, and not the float32 one."""
    from click.testing import CliRunner
    from PIL import Image

    from tcpass.cli import main
    from tcpass.generate import generate, load_pipeline
    from tcpass.plan import save_plan
    from tests.pipelines import build

    build("dit").save_pretrained(tmp_path / "pipe")
    plan = CachePlan(keep_ratio=0.25, schedule=TPRRSchedule(boundary_timestep=500, intervals=(3, 2)))
    save_plan(plan, tmp_path / "plan.json")
    common = ["generate", "--model", str(tmp_path / "pipe"), "--class-label", "1", "--steps", "8"]
    common += ["--plan", str(tmp_path / "plan.json")]
    for d in (dtype, "float32"):
        result = CliRunner().invoke(main, [*common, "--dtype", d, "-o", str(tmp_path / f"{d}.png")])
        assert result.exit_code == 0, result.output
        assert "cached" in result.output
    pipe = load_pipeline(tmp_path / "pipe", getattr(torch, dtype))
    api = generate(pipe, plan, tmp_path, class_label=1, steps=8, seed=0)
    assert pipe.transformer.dtype == getattr(torch, dtype)
    cli = np.asarray(Image.open(tmp_path / f"{dtype}.png"))
    assert np.array_equal(cli, np.asarray(api.image))  # the same pipeline and inputs in one process
    assert not np.array_equal(cli, np.asarray(Image.open(tmp_path / "float32.png")))
