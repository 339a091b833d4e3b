"""ONNX export + the torch-free ONNX Runtime TPRR runtime."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

import tcpass
from tcpass import CachePlan, StepKind
from tcpass.export.onnx_export import export_onnx
from tcpass.export.runtime import ManifestError, OrtTokenCacheRuntime, ddim_schedule, generate
from tcpass.sampling import ddim_sample, make_scheduler
from tests.conftest import make_dit

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
        assert np.abs(got - want).max() <= 1e-4
    assert runtime.step_counts == {
        StepKind.FULL: eager.step_counts[StepKind.FULL],
        StepKind.CACHED: eager.step_counts[StepKind.CACHED],
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


def test_runtime_generates_where_torch_cannot_be_imported(exported):
    _, out = exported
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None      # any `import torch` now raises ImportError
        sys.modules["diffusers"] = None
        import numpy as np
        from tcpass.export.runtime import OrtTokenCacheRuntime, generate
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


@pytest.mark.parametrize("kind", ["dynamic", "toca"])
def test_in_graph_selectors_export_and_match_eager(tmp_path, kind):
    """The learned dynamic predictor and the ToCa-style scores run inside the exported graphs too."""
    from tcpass.predictor import DynamicPredictor, save_predictor

    model = make_dit()
    if kind == "toca":
        selector = tcpass.SelectorSpec(kind="toca")
    else:
        torch.manual_seed(1)
        predictor = DynamicPredictor(hidden_size=32, num_blocks=3, width=8)
        torch.nn.init.normal_(predictor.out.weight)
        digest = save_predictor(predictor, tmp_path / "p.safetensors")
        selector = tcpass.SelectorSpec(kind="dynamic", path=str(tmp_path / "p.safetensors"), sha256=digest)
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv", selector=selector)
    export_onnx(tcpass.transform(model, plan), tmp_path / "onnx", null_label=1000)
    runtime = OrtTokenCacheRuntime(tmp_path / "onnx")
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
        assert np.abs(got - want).max() <= 1e-4
    assert runtime.step_counts[StepKind.CACHED] > 0
