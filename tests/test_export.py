"""ONNX export + the torch-free ONNX Runtime TPRR runtime."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import tcpass
from tcpass import CachePlan, StepKind
from tcpass.export.index_ops import in_place_updates, rows_as_slices
from tcpass.export.onnx_export import export_onnx
from tcpass.export.ort_runtime import ManifestError, OrtTokenCacheRuntime, ddim_schedule, generate
from tcpass.sampling import ddim_sample, make_scheduler
from tests.conftest import make_dit
from tests.tolerance import OTHER_KERNELS, REGROUPED, assert_close

PLAN = CachePlan(keep_ratio=0.25, attention="cached_kv")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_dit()
    transformed = tcpass.transform(model, PLAN)
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(transformed, out, null_label=1000)
    return model, out


def test_graphs_are_checker_clean_and_share_one_weights_file(exported):
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"full", "cached_phase0"} and manifest["opset"] >= 18
    params = sum(p.numel() * 4 for p in make_dit().parameters())
    for entry in manifest["graphs"].values():
        onnx.checker.check_model(str(out / entry["file"]))
        assert (out / entry["file"]).stat().st_size < params / 2  # weights are not inside the graph files
    assert (out / "weights.bin").stat().st_size <= params * 1.05  # each weight stored once


def test_shared_weights_are_one_mapping_of_the_weights_file_and_give_the_same_steps(exported):
    _, out = exported
    shared, own = OrtTokenCacheRuntime(out, share_weights=True), OrtTokenCacheRuntime(out)
    assert own.weights is None and shared.weights is not None
    blob = shared.weights.blob
    start, end = blob.ctypes.data, blob.ctypes.data + blob.nbytes
    tables = [e["initializers"] for e in shared.manifest["graphs"].values()]
    assert len(shared.weights.values) == sum(map(len, tables)) > 0
    assert all(start <= v.data_ptr() < end for v in shared.weights.values)  # views of the one mapping, no copies
    assert sum(length for table in tables for _, _, length, _, _ in table) > blob.nbytes  # the graphs share tensors
    for session in shared.sessions.values():
        assert session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    g = torch.Generator().manual_seed(2)
    for t in (900, 880, 860):  # FULL, then CACHED (MLAS packs weights per call: other rounding)
        inputs = {"hidden_states": torch.randn(2, 4, 16, 16, generator=g).numpy(), "class_labels": np.array([3, 1000])}
        assert_close(
            shared(**inputs, timestep=np.full(2, t)), own(**inputs, timestep=np.full(2, t)), units=OTHER_KERNELS
        )
    assert shared.step_counts == own.step_counts and shared.step_counts[StepKind.CACHED] == 2


def test_cached_graph_moves_whole_rows_and_updates_caches_in_place(exported):
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["graphs"]["cached_phase0"]
    ops = {node.op_type for node in onnx.load(str(out / entry["file"]), load_external_data=False).graph.node}
    assert not ops & {"GatherElements", "ScatterElements"} and {"GatherND", "ScatterND"} <= ops
    assert entry["in_place"] == {s["name"]: s["cache"] for s in entry["outputs"][1:]}  # every cache of this plan
    assert manifest["graphs"]["full"]["in_place"] == {}

    runtime = OrtTokenCacheRuntime(out)
    inputs = {"hidden_states": np.ones((2, 4, 16, 16), np.float32), "class_labels": np.array([3, 1000])}
    runtime(**inputs, timestep=np.full(2, 900))  # FULL: fills the caches
    before = {name: value.data_ptr() for name, value in runtime.caches.items()}
    runtime(**inputs, timestep=np.full(2, 880))
    assert runtime.step_counts[StepKind.CACHED] == 1
    assert {name: value.data_ptr() for name, value in runtime.caches.items()} == before


def test_idle_step_graphs_stop_spinning(exported):
    import onnxruntime as ort

    _, out = exported
    runtime = OrtTokenCacheRuntime(out, threads=1)
    for session in runtime.sessions.values():
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    mine = ort.SessionOptions()
    mine.add_session_config_entry("session.force_spinning_stop", "0")
    kept = OrtTokenCacheRuntime(out, session_options=mine)  # the caller's choice stands
    assert kept.sessions["full"].get_session_options().get_session_config_entry("session.force_spinning_stop") == "0"
    inputs = {"hidden_states": np.ones((2, 4, 16, 16), np.float32), "class_labels": np.array([3, 1000])}
    for t in (900, 880):  # FULL, then CACHED: the same numbers either way (other thread counts: up to rounding)
        got, want = runtime(**inputs, timestep=np.full(2, t)), kept(**inputs, timestep=np.full(2, t))
        assert_close(got, want, units=OTHER_KERNELS, what=f"t={t}")
    assert runtime.step_counts[StepKind.CACHED] == kept.step_counts[StepKind.CACHED] == 1


def _index_model(axis: int, data_shape: list[int], k: int, broadcast_shape: list[int]) -> onnx.ModelProto:
    """GatherElements and ScatterElements on ``axis``, [B, K] indices viewed and expanded as the exporter writes."""
    from onnx import TensorProto, helper, numpy_helper

    view = [1] * len(data_shape)
    view[0], view[axis] = data_shape[0], k
    rows = list(data_shape)
    rows[axis] = k
    nodes = [
        helper.make_node("Reshape", ["idx", "view"], ["idx_view"]),
        helper.make_node("Expand", ["idx_view", "broadcast"], ["idx_full"]),
        helper.make_node("GatherElements", ["data", "idx_full"], ["gathered"], axis=axis),
        helper.make_node("ScatterElements", ["data", "idx_full", "updates"], ["scattered"], axis=axis),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "rows",
        [
            helper.make_tensor_value_info("data", f32, data_shape),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [data_shape[0], k]),
            helper.make_tensor_value_info("updates", f32, broadcast_shape),
        ],
        [
            helper.make_tensor_value_info("gathered", f32, broadcast_shape),
            helper.make_tensor_value_info("scattered", f32, data_shape),
        ],
        [
            numpy_helper.from_array(np.array(view), "view"),
            numpy_helper.from_array(np.array(broadcast_shape), "broadcast"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize(
    ("axis", "data_shape", "broadcast_shape", "rewritten"),
    [
        (1, [2, 10, 6], [2, 4, 6], 2),  # tokens of [B, N, D]
        (2, [2, 3, 10, 5], [2, 3, 4, 5], 2),  # tokens of [B, H, N, Dh] (K/V caches)
        (1, [2, 10, 6], [2, 4, 3], 0),  # not whole rows: left as it is
    ],
)
def test_row_index_rewrite_is_exact(axis, data_shape, broadcast_shape, rewritten):
    import onnxruntime as ort

    model = _index_model(axis, data_shape, 4, broadcast_shape)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    model, count = rows_as_slices(model)
    onnx.checker.check_model(model, full_check=True)
    assert count == rewritten
    assert sum(n.op_type.endswith("Elements") for n in model.graph.node) == 2 - rewritten
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        "data": rng.standard_normal(data_shape).astype(np.float32),
        "idx": np.stack([rng.permutation(data_shape[axis])[:4] for _ in range(2)]),
        "updates": rng.standard_normal(broadcast_shape).astype(np.float32),
    }
    for got, want in zip(session.run(None, feed), original.run(None, feed), strict=True):
        assert np.array_equal(got, want)  # both only move values: no arithmetic to round


def test_in_place_only_when_the_other_readers_run_first():
    from onnx import TensorProto, helper

    def model(late_reader: bool) -> onnx.ModelProto:
        # cache.next = ScatterND(cache, top-2 rows of ||cache - x||^2, new): Sub reads the cache before the scatter
        nodes = [
            helper.make_node("Sub", ["cache", "x"], ["change"]),
            helper.make_node("ReduceSumSquare", ["change", "last"], ["score"], keepdims=0),
            helper.make_node("TopK", ["score", "k"], ["top", "rows"], axis=0),
            helper.make_node("Unsqueeze", ["rows", "last"], ["coords"]),
            helper.make_node("ScatterND", ["cache", "coords", "new"], ["cache.next"]),
        ]
        outputs = ["cache.next"]
        if late_reader:  # reads the old cache but nothing orders it before the scatter
            nodes.append(helper.make_node("Add", ["cache", "x"], ["y"]))
            outputs.append("y")
        info = {
            n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [8, 4]) for n in ("cache", "x", "y", "cache.next")
        }
        new = helper.make_tensor_value_info("new", TensorProto.FLOAT, [2, 4])
        consts = [
            helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
            helper.make_tensor("k", TensorProto.INT64, [1], [2]),
        ]
        graph = helper.make_graph(nodes, "m", [info["cache"], info["x"], new], [info[n] for n in outputs], consts)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        onnx.checker.check_model(model, full_check=True)
        return model

    assert in_place_updates(model(late_reader=False)) == {"cache.next": "cache"}
    assert in_place_updates(model(late_reader=True)) == {}


def test_every_step_matches_eager_transformed(exported):
    model, out = exported
    runtime = OrtTokenCacheRuntime(out)
    eager = tcpass.transform(model, PLAN)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 1000])
    scheduler = make_scheduler()
    scheduler.set_timesteps(20)
    for t in scheduler.timesteps:
        x = torch.randn(2, 4, 16, 16, generator=g)
        inputs = {"hidden_states": x, "timestep": t.expand(2), "class_labels": labels}
        want = eager(**inputs).sample.numpy()
        got = runtime(**{k: v.numpy() for k, v in inputs.items()})
        assert_close(got, want, units=OTHER_KERNELS)
    assert runtime.step_counts == {
        StepKind.FULL: eager.step_counts[StepKind.FULL],
        StepKind.CACHED: eager.step_counts[StepKind.CACHED],
        StepKind.SKIP: 0,
    }
    assert runtime.step_counts[StepKind.CACHED] > 0


def test_numpy_ddim_matches_diffusers_schedule():
    timesteps, _, _ = ddim_schedule(50)
    scheduler = make_scheduler()
    scheduler.set_timesteps(50)
    assert timesteps.tolist() == scheduler.timesteps.tolist()


def test_full_generation_matches_torch(exported):
    model, out = exported
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    want = ddim_sample(tcpass.transform(model, PLAN), noise, torch.tensor([4]), 1000, 50, 4.0).numpy()
    got = generate(OrtTokenCacheRuntime(out), noise.numpy(), np.array([4]), 50, 4.0)
    psnr = 10 * np.log10((want.max() - want.min()) ** 2 / np.mean((got - want) ** 2))
    assert psnr >= 50


def test_guidance_interval_matches_torch(exported):
    model, out = exported
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    kwargs = {"guidance_interval": (200, 600)}
    want = ddim_sample(tcpass.transform(model, PLAN), noise, torch.tensor([4]), 1000, 20, 4.0, **kwargs).numpy()
    got = generate(OrtTokenCacheRuntime(out), noise.numpy(), np.array([4]), 20, 4.0, **kwargs)
    everywhere = generate(OrtTokenCacheRuntime(out), noise.numpy(), np.array([4]), 20, 4.0)
    psnr = 10 * np.log10((want.max() - want.min()) ** 2 / np.mean((got - want) ** 2))
    assert psnr >= 50
    assert np.abs(everywhere - want).max() > 1e-2  # the interval changes the samples
    with pytest.raises(ValueError, match="guidance_interval"):
        generate(OrtTokenCacheRuntime(out), noise.numpy(), np.array([4]), 20, 4.0, guidance_interval=(600, 200))


def test_the_numpy_sampler_takes_text_conditioning_on_a_pixart_export(tmp_path):
    """Any conditioning by input name (caption embeddings and their mask here), as `guided_sample` takes it."""
    from tcpass.sampling import guided_sample
    from tests.families import family_inputs, make_pixart

    model = make_pixart()
    plan = CachePlan(keep_ratio=0.5, schedule=tcpass.TPRRSchedule(intervals=(2, 2)))
    example = family_inputs("pixart", batch=2)  # one image with guidance: [cond; uncond]
    tm = tcpass.transform(model, plan, example_inputs=example)
    export_onnx(tm, tmp_path / "pixart")
    runtime = OrtTokenCacheRuntime(tmp_path / "pixart")
    assert runtime.conditioning_names == ["encoder_hidden_states", "encoder_attention_mask"]
    text, mask = example["encoder_hidden_states"][:1], example["encoder_attention_mask"][:1]
    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    uncond = {"encoder_hidden_states": torch.zeros_like(text), "encoder_attention_mask": mask}
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    want = guided_sample(
        tm,
        noise,
        {**cond, "added_cond_kwargs": example["added_cond_kwargs"]},
        {**uncond, "added_cond_kwargs": example["added_cond_kwargs"]},
        num_steps=10,
    ).numpy()
    as_numpy = {k: v.numpy() for k, v in cond.items()}
    got = generate(runtime, noise.numpy(), as_numpy, 10, 4.0, uncond={k: v.numpy() for k, v in uncond.items()})
    assert_close(got, want, units=OTHER_KERNELS)
    assert runtime.step_counts[StepKind.CACHED] > 0
    other = {**uncond, "encoder_hidden_states": torch.ones_like(text)}  # the unconditional rows are read
    other_uncond = generate(runtime, noise.numpy(), as_numpy, 10, 4.0, uncond={k: v.numpy() for k, v in other.items()})
    assert np.abs(other_uncond - got).max() > 1e-3
    with pytest.raises(ValueError, match=r"conditioning has inputs \['encoder_hidden_states'\]; the export takes"):
        generate(runtime, noise.numpy(), {"encoder_hidden_states": text.numpy()}, 10, 4.0)
    with pytest.raises(ValueError, match="takes no class labels"):
        generate(runtime, noise.numpy(), np.array([3]), 10, 4.0)


def test_an_export_records_its_guidance_interval_and_generate_uses_it(tmp_path):
    model = make_dit()
    transformed = tcpass.transform(model, PLAN)
    with pytest.raises(ValueError, match="guidance_interval"):
        export_onnx(transformed, tmp_path / "bad", null_label=1000, guidance_interval=(600, 200))
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    export_onnx(transformed, tmp_path / "out", null_label=1000, guidance_interval=(200, 600))
    runtime = OrtTokenCacheRuntime(tmp_path / "out")
    assert runtime.guidance_interval == (200.0, 600.0)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    want = ddim_sample(
        tcpass.transform(model, PLAN), noise, torch.tensor([4]), 1000, 20, 4.0, guidance_interval=(200, 600)
    ).numpy()
    got = generate(runtime, noise.numpy(), np.array([4]), 20, 4.0)  # the recorded interval
    every_step = generate(runtime, noise.numpy(), np.array([4]), 20, 4.0, guidance_interval=(0, 1000))
    assert_close(got, want, units=OTHER_KERNELS)
    assert np.abs(every_step - want).max() > 1e-2


CALIBRATED = [995, 874, 749, 616, 480, 367, 218, 93]


@pytest.mark.parametrize("steps, timesteps", [(1, None), (2, None), (8, None), (20, None), (8, CALIBRATED)])
def test_the_numpy_dpm_solver_steps_as_diffusers_does(steps, timesteps):
    """The numpy DPM-Solver++(2M) against diffusers' scheduler (built here) fed the same predictions."""
    from diffusers import DPMSolverMultistepScheduler

    from tcpass.export.ort_runtime import numpy_sampler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
        algorithm_type="dpmsolver++", solver_order=2,
    )  # fmt: skip
    scheduler.set_timesteps(**({"num_inference_steps": steps} if timesteps is None else {"timesteps": timesteps}))
    order, update = numpy_sampler("dpmpp", steps, timesteps)
    assert order.tolist() == scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(4)
    x = want = torch.randn(2, 4, 8, 8, generator=g)
    got = x.numpy()
    for i, t in enumerate(scheduler.timesteps):  # a prediction that depends on the latents, as a model's does
        drift = torch.randn(2, 4, 8, 8, generator=g)
        want = scheduler.step(0.8 * torch.tanh(want) + 0.3 * drift, t, want).prev_sample
        got = update(i, 0.8 * np.tanh(got) + 0.3 * drift.numpy(), got)
    assert_close(got, want, units=REGROUPED)  # the same arithmetic in numpy: <5 units measured
    assert got.dtype == np.float32


@pytest.mark.parametrize("timesteps", [None, CALIBRATED], ids=["default spacing", "calibrated timesteps"])
def test_the_onnx_runtime_samples_a_dpm_solver_plan_as_the_torch_sampler_does(tmp_path, timesteps):
    """A plan calibrated under DPM-Solver++ (its skip table keyed by that sampler's timesteps) runs under it."""
    from tcpass.sampling import guided_sample

    model = make_dit()
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv", sampler="dpmpp", sampler_timesteps=timesteps)
    transformed = tcpass.transform(model, plan)
    export_onnx(transformed, tmp_path / "out", null_label=1000)
    runtime = OrtTokenCacheRuntime(tmp_path / "out")
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    steps = None if timesteps else 10  # None: as many steps as the plan's timesteps
    got = generate(runtime, noise.numpy(), np.array([4]), steps, 4.0)
    labels = {"class_labels": torch.tensor([4])}
    want = guided_sample(transformed, noise, labels, {"class_labels": torch.tensor([1000])}, 8 if timesteps else 10,
                         4.0, sampler="dpmpp")  # fmt: skip
    assert_close(got, want.numpy(), units=OTHER_KERNELS)
    assert runtime.step_counts[StepKind.CACHED] > 0
    if timesteps is None:  # what the runtime did before it read the plan's sampler: DDIM
        assert np.abs(generate(runtime, noise.numpy(), np.array([4]), 10, 4.0, sampler="ddim") - got).max() > 1e-2


@pytest.mark.parametrize(
    "fields, kwargs, match",
    [
        ({"sampler": "flow"}, {}, r"sampler = 'flow': the ONNX Runtime sampler runs 'ddim' and 'dpmpp'"),
        (
            {"sampler": "dpmpp", "sampler_timesteps": [999, 500]},
            {"num_steps": 5},
            r"2 timesteps given for num_steps = 5",
        ),
        ({"sampler": "dpmpp", "sampler_timesteps": [999, 500]}, {"sampler": "ddim"}, r"supported for 'dpmpp' only"),
    ],
)
def test_the_onnx_runtime_sampler_refuses_what_it_cannot_run_naming_the_fix(fields, kwargs, match):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=match):
        generate(SimpleNamespace(plan=CachePlan(blocks=[], **fields)), np.zeros((1, 4, 16, 16), np.float32),
                 np.array([1]), **kwargs)  # fmt: skip


def test_runtime_generates_where_torch_cannot_be_imported(exported):
    _, out = exported
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None      # any `import torch` now raises ImportError
        sys.modules["diffusers"] = None
        import numpy as np
        from tcpass.export.ort_runtime import OrtTokenCacheRuntime, generate
        images = generate(OrtTokenCacheRuntime({str(out)!r}), np.zeros((1, 4, 16, 16), np.float32), np.array([1]), 10)
        assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
        print("generated", images.shape, bool(np.isfinite(images).all()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "generated (1, 4, 16, 16) True" in result.stdout


@pytest.fixture
def copy_of(exported, tmp_path):
    _, out = exported
    target = tmp_path / "exported"
    shutil.copytree(out, target)
    return target


def test_missing_graph_file_is_named(copy_of):
    (copy_of / "cached_phase0.onnx").unlink()
    with pytest.raises(ManifestError, match=r"cached_phase0.onnx is missing \(manifest.json graphs.cached_phase0"):
        OrtTokenCacheRuntime(copy_of)


def test_manifest_shape_mismatch_is_named(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["graphs"]["full"]["inputs"][0]["shape"] = [4, 4, 16, 16]
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"graphs.full.inputs\[0\] \(hidden_states\) is \[4, 4, 16, 16\]"):
        OrtTokenCacheRuntime(copy_of)


def test_graph_from_another_export_is_detected(copy_of):
    (copy_of / "full.onnx").write_bytes((copy_of / "cached_phase0.onnx").read_bytes())
    with pytest.raises(ManifestError, match="sha256 differs from manifest.json graphs.full.sha256"):
        OrtTokenCacheRuntime(copy_of)


def test_manifest_from_another_plan_is_refused(copy_of):
    other = CachePlan(keep_ratio=0.5, attention="cached_kv")
    with pytest.raises(ManifestError, match=r"exported for another plan \(fields \['keep_ratio'\] differ\)"):
        OrtTokenCacheRuntime(copy_of, expected_plan=other)
    OrtTokenCacheRuntime(copy_of, expected_plan=PLAN)


def test_wrong_input_shape_or_dtype_is_named(copy_of):
    runtime = OrtTokenCacheRuntime(copy_of)
    good = {
        "hidden_states": np.zeros((2, 4, 16, 16), np.float32),
        "timestep": np.full(2, 900, np.int64),
        "class_labels": np.zeros(2, np.int64),
    }
    with pytest.raises(ValueError, match=r"input 'hidden_states': got shape \[3, 4, 16, 16\] float32"):
        runtime(**{**good, "hidden_states": np.zeros((3, 4, 16, 16), np.float32)})
    with pytest.raises(ValueError, match=r"input 'timestep': got shape \[2\] float32"):
        runtime(**{**good, "timestep": np.full(2, 900, np.float32)})
    with pytest.raises(ManifestError, match="manifest.json not found"):
        OrtTokenCacheRuntime(copy_of / "nowhere")


def test_cli_export_from_a_saved_model_directory(tmp_path):
    from click.testing import CliRunner

    from tcpass.cli import main

    make_dit().save_pretrained(tmp_path / "dit")
    tcpass.save_plan(PLAN, tmp_path / "plan.json")
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--model",
            str(tmp_path / "dit"),
            "--plan",
            str(tmp_path / "plan.json"),
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "weights.bin" in result.output and "total" in result.output
    runtime = OrtTokenCacheRuntime(tmp_path / "out", expected_plan=PLAN)
    assert runtime.null_label == 1000
    images = generate(runtime, np.zeros((1, 4, 16, 16), np.float32), np.array([2]), num_steps=5)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("kind", ["dynamic", "toca", "random"])
def test_selectors_export_and_match_eager(tmp_path, kind):
    """The learned dynamic predictor and the ToCa-style scores run inside the exported graphs too; the
    random selector draws the same tokens in both runtimes (one numpy definition)."""
    from tcpass.predictor import DynamicPredictor, save_predictor

    model = make_dit()
    if kind in ("toca", "random"):
        selector = tcpass.SelectorSpec(kind=kind, seed=3)
    else:
        torch.manual_seed(1)
        predictor = DynamicPredictor(hidden_size=32, num_blocks=3, width=8)
        torch.nn.init.normal_(predictor.out.weight)
        digest = save_predictor(predictor, tmp_path / "p.safetensors")
        selector = tcpass.SelectorSpec(kind="dynamic", path=str(tmp_path / "p.safetensors"), sha256=digest)
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv", selector=selector)
    export_onnx(tcpass.transform(model, plan), tmp_path / "onnx", null_label=1000)
    _assert_runtime_matches_eager(model, plan, OrtTokenCacheRuntime(tmp_path / "onnx"))


def test_static_selector_export_matches_eager_and_guards_its_tables(tmp_path):
    from tcpass.selectors import StaticScoreSelector

    model = make_dit()
    scores = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(2))
    digest = StaticScoreSelector(scores, torch.tensor([900.0, 300.0]), torch.arange(3)).save(tmp_path / "s.safetensors")
    selector = tcpass.SelectorSpec(kind="static", path=str(tmp_path / "s.safetensors"), sha256=digest)
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv", selector=selector)
    export_onnx(tcpass.transform(model, plan), tmp_path / "onnx", null_label=1000)
    _assert_runtime_matches_eager(model, plan, OrtTokenCacheRuntime(tmp_path / "onnx"))
    table = tmp_path / "onnx" / "static_scores.npy"
    np.save(table, -np.load(table), allow_pickle=False)  # same size, other ranking
    with pytest.raises(ManifestError, match="static_scores.npy: sha256 differs from manifest.json selector.scores"):
        OrtTokenCacheRuntime(tmp_path / "onnx")


def _assert_runtime_matches_eager(model, plan, runtime):
    eager = tcpass.transform(model, plan)
    g = torch.Generator().manual_seed(0)
    scheduler = make_scheduler()
    scheduler.set_timesteps(8)
    for t in scheduler.timesteps:
        inputs = {
            "hidden_states": torch.randn(2, 4, 16, 16, generator=g),
            "timestep": t.expand(2),
            "class_labels": torch.tensor([3, 1000]),
        }
        want = eager(**inputs).sample.numpy()
        got = runtime(**{k: v.numpy() for k, v in inputs.items()})
        assert_close(got, want, units=OTHER_KERNELS)
    assert runtime.step_counts[StepKind.CACHED] > 0


def test_manifest_records_the_sha256_of_every_file(exported):
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    weights = manifest["weights"]
    assert weights["file"] == "weights.bin" and weights["bytes"] == (out / "weights.bin").stat().st_size
    assert weights["sha256"] == hashlib.sha256((out / "weights.bin").read_bytes()).hexdigest()
    for entry in manifest["graphs"].values():
        assert entry["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()


def test_zeroed_weights_of_the_same_size_are_refused(copy_of):
    weights = copy_of / "weights.bin"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2 :] = bytes(len(blob) - len(blob) // 2)
    weights.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match=r"weights.bin: sha256 differs from manifest.json weights.sha256"):
        OrtTokenCacheRuntime(copy_of)
    OrtTokenCacheRuntime(copy_of, verify_checksums=False)  # the explicit opt-out skips hashing


def test_truncated_weights_are_refused_even_without_checksums(copy_of):
    weights = copy_of / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ManifestError, match=r"weights.bin is \d+ bytes but manifest.json weights.bytes = \d+"):
        OrtTokenCacheRuntime(copy_of, verify_checksums=False)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m["model"].update(null_label=3), r"model.null_label = 3 but full.onnx was exported with .* = 1000"),
        (lambda m: m["model"].update(num_tokens=32), "model.num_tokens = 32"),
        (lambda m: m["schedule"].update(intervals=[8, 8]), r"schedule.intervals\[0\] = 8"),
        (lambda m: m["selector"].update(seed=7), "selector.seed = 7"),
        (lambda m: m["graphs"]["cached_phase0"].update(in_place={}), "graphs.cached_phase0.in_place"),
    ],
)
def test_edited_manifest_fields_are_refused_naming_the_field(copy_of, edit, field):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    edit(manifest)
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    for verify in (True, False):  # checked against the graphs' own copy, not by hashing
        with pytest.raises(ManifestError, match=f"manifest.json {field}.*the manifest was edited"):
            OrtTokenCacheRuntime(copy_of, verify_checksums=verify)


def test_null_label_is_checked_against_the_model_config(tmp_path):
    transformed = tcpass.transform(make_dit(num_layers=1, sample_size=8), CachePlan.no_cache())
    with pytest.raises(ValueError, match=r"null_label = 7: the model's class embedding reserves label 1000"):
        export_onnx(transformed, tmp_path / "out", null_label=7)
    assert not (tmp_path / "out").exists()
    export_onnx(transformed, tmp_path / "out")  # default: the label the config reserves
    assert OrtTokenCacheRuntime(tmp_path / "out").null_label == 1000


def test_the_recorded_opset_is_the_one_written(tmp_path):
    transformed = tcpass.transform(make_dit(num_layers=1, sample_size=8), CachePlan.no_cache())
    export_onnx(transformed, tmp_path / "out", opset=18)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    graph = onnx.load(str(tmp_path / "out" / "full.onnx"), load_external_data=False)
    assert manifest["opset"] == 18 and [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]
    with pytest.raises(ValueError, match=r"opset = 17: the exporter writes opsets 18..25"):
        export_onnx(transformed, tmp_path / "other", opset=17)


def test_export_over_a_foreign_directory_is_refused(exported, tmp_path):
    model, _ = exported
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files an export does not write \(\['notes.txt'\]\)"):
        export_onnx(tcpass.transform(model, PLAN), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_interrupted_re_export_leaves_the_previous_export_untouched(copy_of):
    before = _snapshot(copy_of)
    script = textwrap.dedent(f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (&)
        import torch
        torch.set_num_threads(1)  # tiny graphs: one thread is fastest on a busy machine
        import tcpass
        import time
        from tcpass.export import onnx_export
        from tcpass.export.onnx_export import export_onnx
        from tests.conftest import make_dit
        write_graph = onnx_export._export_graph
        def slow_write_graph(*args, **kwargs):  # widen the window the test interrupts: the export half written
            for _ in range(600):  # short sleeps: a SIGINT landing just before a long sleep's syscall waits it out
                time.sleep(0.1)
            return write_graph(*args, **kwargs)
        onnx_export._export_graph = slow_write_graph
        plan = tcpass.CachePlan(keep_ratio=0.5, attention="cached_kv")
        export_onnx(tcpass.transform(make_dit(), plan), {str(copy_of)!r}, null_label=1000)
    """)
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-c", script], cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # interrupt as soon as the new export starts writing (into a temporary directory, or into the target)
    while not list(copy_of.parent.glob(f".{copy_of.name}.tmp-*")) and _snapshot(copy_of) == before:
        assert process.poll() is None, f"the export ended before it was interrupted: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the export did not start"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)  # a slow, loaded machine: the traceback and exit take time
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    assert _snapshot(copy_of) == before
    assert not list(copy_of.parent.glob(f".{copy_of.name}.*"))  # the temporary directory is removed
    OrtTokenCacheRuntime(copy_of, expected_plan=PLAN)


def test_re_export_replaces_the_previous_export(exported, copy_of):
    model, _ = exported
    other = CachePlan(keep_ratio=0.5, attention="cached_kv")
    export_onnx(tcpass.transform(model, other), copy_of, null_label=1000)
    OrtTokenCacheRuntime(copy_of, expected_plan=other)
    assert not list(copy_of.parent.glob(f".{copy_of.name}.*"))


def test_export_directory_gets_the_usual_permissions(exported, tmp_path):
    import os

    model, _ = exported
    export_onnx(tcpass.transform(model, CachePlan.no_cache()), tmp_path / "out", null_label=1000)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_runtime_refuses_bad_timesteps_and_other_threads_generations(exported):
    """The ORT runtime shares the torch runtime's generation rules (tcpass.schedule)."""
    import threading

    _, out = exported
    runtime = OrtTokenCacheRuntime(out)
    inputs = {
        "hidden_states": np.zeros((2, 4, 16, 16), np.float32),
        "class_labels": np.array([3, 1000]),
    }
    runtime(**inputs, timestep=np.array([999, 999]))
    with pytest.raises(ValueError, match="0..1000"):
        runtime(**inputs, timestep=np.array([5000, 5000]))
    errors = []

    def other():
        try:
            runtime(**inputs, timestep=np.array([950, 950]))
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(60)
    assert errors and "another thread" in errors[0]
    runtime(**inputs, timestep=np.array([950, 950]))  # the owner continues: CACHED, as if nothing happened
    assert runtime.step_counts[StepKind.CACHED] == 1 and runtime.step_counts[StepKind.FULL] == 1
