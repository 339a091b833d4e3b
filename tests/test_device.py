"""Device-correct without a GPU: every tensor tcpass creates is on the model's device.

On a GPU, a tensor created without ``device=`` lands on the CPU, and the first op mixing it with the
model's tensors fails (CUDA only lets 0-dim CPU tensors mix with GPU ones). This machine has no GPU, so
the check is made where the bug starts: while the tests below run, every tensor factory (``torch.eye``,
``torch.ones``, ``torch.tensor``, ...) that code in ``tcpass/`` calls without ``device=`` and that returns
more than a scalar raises, naming the file and line (`ExplicitDevices`). Before the fixes it caught
`tcpass.calibrate.forecast` adding such a ``torch.eye`` to the Gram matrix of the model's residuals and
`tcpass.calibrate.steps.measure_call_seconds` feeding such a scale to a SKIP graph (and the calibration
conditioning, noise and the token calibration's masks).
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import tcpass
from tcpass import CachePlan, SelectorSpec, StepKind, StepSkip, TPRRSchedule
from tcpass.calibrate import collect
from tcpass.sampling import ddim_sample
from tests.conftest import dit_inputs, make_dit

PACKAGE = Path(tcpass.__file__).parent
FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.arange,
    torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm,
}  # fmt: skip


class ExplicitDevices(TorchFunctionMode):
    """Raise when code in tcpass/ creates a tensor of one or more dimensions without ``device=``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and "device" not in kwargs and isinstance(out, torch.Tensor) and out.dim() > 0:
            frame = sys._getframe(1)
            while frame is not None and Path(frame.f_code.co_filename).is_relative_to(Path(torch.__file__).parent):
                frame = frame.f_back
            if frame is not None and Path(frame.f_code.co_filename).is_relative_to(PACKAGE):
                where = f"{Path(frame.f_code.co_filename).relative_to(PACKAGE.parent)}:{frame.f_lineno}"
                raise RuntimeError(f"{where}: torch.{func.__name__} without device= (on a GPU it lands on the CPU)")
        return out


STEPS = 8
PLANS = {
    "default": CachePlan(),
    "cached_kv": CachePlan(keep_ratio=0.5, attention="cached_kv", schedule=TPRRSchedule(intervals=(3, 3))),
    "random": CachePlan(selector=SelectorSpec(kind="random"), schedule=TPRRSchedule(intervals=(3, 3))),
    "toca": CachePlan(selector=SelectorSpec(kind="toca"), schedule=TPRRSchedule(intervals=(3, 3))),
    "forecast": CachePlan(keep_ratio=0.5, skip=StepSkip(timesteps=[750, 500], weights=[[1.5, -0.5], [1.2, -0.2]])),
    "split guidance": CachePlan(blocks=(), skip=StepSkip(timesteps=[750, 500]), guidance_reuse=True),
}


def test_the_check_catches_a_tensor_tcpass_creates_without_a_device():
    in_tcpass = compile("torch.eye(2)", str(PACKAGE / "calibrate" / "forecast.py"), "eval")  # as if written there
    with ExplicitDevices(), pytest.raises(RuntimeError, match=r"calibrate/forecast.py:1: torch.eye without device="):
        eval(in_tcpass)
    x = torch.ones(2, 2)
    explicit = compile("torch.eye(2, device=x.device)", str(PACKAGE / "x.py"), "eval")
    scalar = compile("torch.tensor(2.0)", str(PACKAGE / "x.py"), "eval")
    with ExplicitDevices():
        assert eval(explicit, {"x": x, "torch": torch}).shape == (2, 2)
        assert eval(scalar, {"torch": torch}).dim() == 0  # a scalar mixes with tensors on any device
        torch.eye(2)  # outside tcpass/ (this test, torch, diffusers): not tcpass's to fix


@pytest.mark.parametrize("name", list(PLANS))
def test_runtime_and_sampler_create_nothing_on_the_default_device(name):
    model = make_dit()
    plan = PLANS[name]
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    want = ddim_sample(tcpass.transform(model, plan), noise, labels, 1000, STEPS, 4.0, guidance_interval=(0, 900))
    with ExplicitDevices():
        tm = tcpass.transform(model, plan)
        got = ddim_sample(tm, noise, labels, 1000, STEPS, 4.0, guidance_interval=(0, 900))
    assert got.device == noise.device and torch.equal(got, want)  # the same graphs, the same numbers
    assert tm.step_counts[StepKind.CACHED] + tm.step_counts[StepKind.SKIP] > 0


def test_one_call_with_a_timestep_of_another_shape_creates_nothing_on_the_default_device():
    model, inputs = make_dit(), dit_inputs()
    with ExplicitDevices():
        out = tcpass.transform(model, CachePlan())(**{**inputs, "timestep": torch.tensor(900, device="cpu")})
    assert out.sample.device.type == "cpu"


def test_step_calibration_and_forecast_fitting_create_nothing_on_the_default_device(tmp_path, monkeypatch):
    from tcpass.calibrate import steps as cs
    from tcpass.calibrate.forecast import fit_forecast

    model = make_dit()
    with ExplicitDevices():
        data = collect(model, num_samples=2, steps=STEPS, seed=3, progress=False)
        timesteps = [float(t) for t in data.timesteps]
        fit = fit_forecast(model, StepSkip(timesteps=[timesteps[3], timesteps[5]]), data, history=2)
        seconds = cs.measure_call_seconds(model, 4, reps=1)
        ratios = cs.magnitude_ratios(model, data)
    assert fit.samples.device.type == "cpu" and len(fit.skip.weights) == 2
    assert set(seconds) >= {"eager", "full", "skip_stack", "skip_output"} and len(ratios) == STEPS


@pytest.mark.parametrize("predictor", ["dynamic", "static"])
def test_token_calibration_creates_nothing_on_the_default_device(tmp_path, predictor):
    from tcpass.calibrate import calibrate

    model = make_dit(num_layers=2)
    with ExplicitDevices():
        report = calibrate(
            model,
            tmp_path / "plan.json",
            min_psnr=-100.0,  # a random tiny model: any plan passes; this test is about devices
            predictor=predictor,
            attention="full_kv",
            num_samples=2,
            steps=STEPS,
            iterations=2,
            ratios=(0.5,),
            verify_reps=1,
            progress=False,
        )
    assert report.plan.blocks
