"""The command line checks its arguments before any work and answers misuse with one line, not a traceback."""

import json
import sys

import pytest
from click.testing import CliRunner

import tcpass
from tcpass.cli import main
from tests.conftest import make_dit


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    tcpass.save_plan(tcpass.CachePlan(), path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    ("args", "option", "rule"),
    [
        (["demo", "--steps", "0"], "--steps", "0 is not in the range x>=1"),
        (["demo", "--per-class", "0"], "--per-class", "0 is not in the range x>=1"),
        (["demo", "--rounds", "-1"], "--rounds", "-1 is not in the range x>=1"),
        (["generate", "--model", "m", "--steps", "0"], "--steps", "0 is not in the range x>=1"),
        (["calibrate", "--min-psnr", "30", "-o", "{tmp}/p.json", "--samples", "0"], "--samples", "x>=1"),
        (["calibrate", "--min-psnr", "30", "-o", "{tmp}/p.json", "--steps", "0"], "--steps", "x>=1"),
        (["calibrate", "--min-psnr", "30", "-o", "{tmp}/p.json", "--batch", "0"], "--batch", "x>=1"),
        (["calibrate", "--target-speedup", "1", "-o", "{tmp}/p.json"], "--target-speedup", "1.0 is not in the range"),
        (["calibrate", "--target-speedup", "0.5", "-o", "{tmp}/p.json"], "--target-speedup", "x>1"),
        (["export", "--model", "m", "--plan", "{plan}", "-o", "{tmp}/out", "--batch", "0"], "--batch", "x>=1"),
        (["export", "--model", "m", "--plan", "{plan}", "-o", "{tmp}/out", "--opset", "17"], "--opset", "18<=x<=25"),
        (["export", "--model", "m", "--plan", "{plan}", "-o", "{tmp}/out", "--opset", "30"], "--opset", "18<=x<=25"),
        (["serve", "--replicas", "0"], "--replicas", "x>=1"),
        (["demo", "--guidance-interval", "700", "100"], "--guidance-interval", "need 0 <= LO < HI"),
        (
            ["calibrate", "--min-psnr", "30", "-o", "{tmp}/p.json", "--guidance-interval", "-1", "5"],
            "--guidance-interval",
            "LO < HI",
        ),
        (["serve", "--max-batch", "0"], "--max-batch", "x>=1"),
        (["serve", "--port", "0"], "--port", "1<=x<=65535"),
        (["serve", "--batch-wait-ms", "-1"], "--batch-wait-ms", "x>=0"),
        (["serve", "--runtime", "ort"], "--model", "needs the directory `tcpass export` wrote"),
        (["serve", "--batch-sizes", "1,8"], "--batch-sizes", "sizes must be in 1..4"),
        (["serve", "--batch-sizes", "1,x"], "--batch-sizes", "expected integers"),
    ],
)
def test_out_of_range_values_are_refused_before_any_work(plan_file, args, option, rule):
    result = invoke(*(a.format(plan=plan_file, tmp=plan_file.parent) for a in args))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and rule in result.output


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["schedule"].update(intervals=3), "schedule.intervals = 3: type error"),
        (lambda d: d.update(keep_ratio="abc"), "keep_ratio = 'abc': type error"),
        (lambda d: d["schedule"].update(full_below_timestep="abc"), "schedule.full_below_timestep = 'abc': type error"),
        (lambda d: d.update(attention="flash"), "attention = 'flash' is unknown"),
    ],
)
@pytest.mark.parametrize(
    "command", [["demo"], ["generate", "--model", "m"], ["export", "--model", "m", "-o", "o"], ["serve"]]
)
def test_a_bad_plan_file_is_one_line_naming_file_and_field(tmp_path, command, edit, field):
    plan = tcpass.CachePlan().to_dict()
    edit(plan)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(plan))
    result = invoke(*command, "--plan", path)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "'--plan'" in error[0] and f"{path}: {field}" in error[0]


def test_a_plan_with_tampered_weights_is_refused_by_the_cli(tmp_path):
    weights = tmp_path / "p.safetensors"
    weights.write_bytes(b"not the weights")
    selector = tcpass.SelectorSpec(kind="dynamic", path="p.safetensors", sha256="0" * 64)
    tcpass.save_plan(tcpass.CachePlan(selector=selector), tmp_path / "plan.json")
    result = invoke("demo", "--plan", tmp_path / "plan.json")
    assert result.exit_code == 2 and "selector.sha256 0000" in result.output and "was changed" in result.output


@pytest.mark.parametrize("command", [["demo"], ["generate", "--model", "m"]])
def test_output_in_a_missing_directory_fails_before_the_run(tmp_path, command):
    result = invoke(*command, "-o", tmp_path / "missing" / "x.png")
    assert result.exit_code == 2, result.output
    assert f"directory {tmp_path / 'missing'} does not exist" in result.output


def test_export_without_the_onnx_extra_names_the_extra(plan_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError, as when not installed
    monkeypatch.delitem(sys.modules, "tcpass.export.onnx_export", raising=False)
    result = invoke("export", "--model", "m", "--plan", plan_file, "-o", plan_file.parent / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "need the onnx extra (onnx is missing)" in result.output and 'pip install -e ".[onnx]"' in result.output


def test_onnx_runtime_without_the_onnx_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "tcpass.export.ort_runtime", raising=False)
    with pytest.raises(ImportError, match=r"onnx extra \(onnxruntime is missing\): pip install \"tcpass\[onnx\]\""):
        import tcpass.export.ort_runtime  # noqa: F401


def test_export_errors_are_one_line(tmp_path, plan_file):
    make_dit(num_layers=1, sample_size=8).save_pretrained(tmp_path / "dit")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = invoke("export", "--model", tmp_path / "dit", "--plan", plan_file, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: ") and "holds files an export does not write" in result.output
    result = invoke("export", "--model", tmp_path / "dit", "--plan", plan_file, "-o", tmp_path / "o", "--null-label", 5)
    assert result.exit_code == 1 and "null_label = 5: the model's class embedding reserves label 1000" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"verify_reps": 2, "guidance_scale": 4.0, "guidance_interval": (100.0, 700.0)}),
        (
            ["--verify-rounds", "5", "--guidance", "3", "--guidance-interval", "0", "1000"],
            {"verify_reps": 5, "guidance_scale": 3.0, "guidance_interval": (0.0, 1000.0)},
        ),
    ],
)
def test_calibrate_passes_the_sampler_and_verification_rounds_on(tmp_path, monkeypatch, args, expected):
    """The shipped emoji weights calibrate under their own guidance interval unless told otherwise."""
    import tcpass.calibrate.steps as steps
    from tcpass.zoo import reference

    seen = {}

    def fake(model, out, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(steps, "calibrate_steps", fake)
    emoji_dir = reference("emoji").model_dir()
    out = tmp_path / "p.json"
    result = invoke("calibrate", "--policy", "steps", "--model", emoji_dir, "--target-speedup", "2", "-o", out, *args)
    assert isinstance(result.exception, RuntimeError), result.output
    assert {k: seen[k] for k in expected} == expected
    assert f"CFG {expected['guidance_scale']:g}" in result.output


def test_each_calibration_method_shows_only_its_own_options(tmp_path, monkeypatch):
    """`tcpass calibrate tokens|steps`: each lists its own options; the older `--policy` form still dispatches."""
    import tcpass.calibrate.steps as steps

    tokens, steps_help = invoke("calibrate", "tokens", "--help").output, invoke("calibrate", "steps", "--help").output
    out = tmp_path / "p.json"
    for common in ("--target-speedup", "--samples", "--guidance-interval", "--out"):
        assert common in tokens and common in steps_help
    assert "--keep-ratio" in tokens and "--predictor" in tokens and "--forecast" not in tokens
    assert "--token-forecast" in tokens and "--token-forecast" not in steps_help
    result = invoke("calibrate", "tokens", "--token-forecast", "anchored:x", "--min-psnr", "30", "-o", out)
    assert result.exit_code == 2 and "expected reuse or kind:order" in result.output, result.output
    result = invoke("calibrate", "tokens", "--token-forecast", "cubic:1", "--min-psnr", "30", "-o", out)
    assert result.exit_code == 2 and "forecast.kind = 'cubic' is unknown" in result.output, result.output
    assert "--forecast" in steps_help and "--keep-steps" in steps_help and "--predictor" not in steps_help
    result = invoke("calibrate", "--policy", "steps", "--predictor", "static", "--min-psnr", "30", "-o", out)
    assert result.exit_code == 2 and "No such option '--predictor'" in result.output, result.output
    result = invoke("calibrate", "--policy", "frames", "--min-psnr", "30", "-o", out)
    assert result.exit_code == 2 and "'frames': expected one of ['steps', 'tokens']" in result.output, result.output
    called = []
    monkeypatch.setattr(steps, "calibrate_steps", lambda *a, **k: called.append(k) or (_ for _ in ()).throw(KeyError))
    invoke("calibrate", "--policy=steps", "--min-psnr", "30", "--keep-steps", "-o", out)
    assert called and called[0]["keep_steps"] is True and not out.exists()
