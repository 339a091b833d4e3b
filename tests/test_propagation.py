"""Cluster propagation (`tcpass.forecasters.propagation`): a kept token's correction spread to the pruned
tokens whose cached residual is most like its own.

The golden test checks the graphs against an eager reference written here: per-token histories as Python
lists, the nearest kept token by `torch.nn.functional.cosine_similarity` in float64, row by row.
"""

import copy
import dataclasses

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import tcpass
from tcpass import CachePlan, ForecastSpec, StepKind
from tcpass.export.onnx_export import export_onnx
from tcpass.export.ort_runtime import OrtTokenCacheRuntime
from tests.conftest import dit_inputs, make_dit
from tests.test_forecast_taylor import (
    BLOCKS,
    EVERY_THIRD,
    KEEP,
    REUSED_BLOCK,
    TIMESTEPS,
    ForecastReference,
    _run,
    _static_plan,
    _steps,
)
from tests.tolerance import OTHER_KERNELS, REGROUPED, assert_close


class PropagationReference(ForecastReference):
    """`ForecastReference` (polynomial forecasts through each token's last ``order + 1`` computed residuals)
    whose pruned tokens also get ``weight`` x the correction of their nearest kept token."""

    def __init__(self, model, order, weight, select):
        super().__init__(model, order, select)
        self.weight = weight

    def refine(self, forecast, latest, idx, fresh):
        out = forecast.clone()
        for row in range(forecast.shape[0]):
            kept = idx[row].tolist()
            features = latest[row].double()
            sim = F.cosine_similarity(features[:, None, :], features[kept][None, :, :], dim=-1, eps=1e-12)
            nearest = sim.argmax(-1)  # [N]
            correction = fresh[row] - forecast[row, kept]
            out[row] += self.weight * correction[nearest]
        return out


@pytest.mark.parametrize(("kind", "order", "weight"), [("reuse", 0, 1.0), ("taylor", 1, 0.5)])
def test_propagation_matches_an_eager_reference(tmp_path, kind, order, weight):
    model = make_dit()
    spec = ForecastSpec(kind=kind, order=max(order, 1), propagate=weight)
    plan, scores = _static_plan(tmp_path, spec)
    steps = _steps(dit_inputs())
    tm = tcpass.transform(model, plan)
    got = _run(tm, steps)
    assert tm.step_counts == {StepKind.FULL: 3, StepKind.CACHED: 5}

    def select(b, step, batch):
        return None if b == REUSED_BLOCK else scores[BLOCKS.index(b), step].topk(KEEP).indices.expand(batch, KEEP)

    reference = PropagationReference(copy.deepcopy(model), order, weight, select)
    fulls = [i % 3 == 0 for i in range(len(TIMESTEPS))]
    want = [reference(s, full=f, step=i) for i, (s, f) in enumerate(zip(steps, fulls, strict=True))]
    for i in range(len(TIMESTEPS)):
        assert_close(got[i], want[i], units=REGROUPED, what=f"step {i} (t={TIMESTEPS[i]})")
    unspread = _run(
        tcpass.transform(model, dataclasses.replace(plan, forecast=ForecastSpec(kind, max(order, 1)))), steps
    )
    assert (got[1] - unspread[1]).abs().max() > 1e-3, "propagation must change the first CACHED step"
    assert_close(got[0], unspread[0], units=REGROUPED)  # a FULL step is not touched


def test_propagation_compiles_once_without_graph_breaks():
    torch._dynamo.reset()
    counters.clear()
    model = make_dit()
    forecast = ForecastSpec(kind="taylor", order=1, propagate=0.5)
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv", schedule=EVERY_THIRD, forecast=forecast)
    compiled = tcpass.transform(model, plan, backend="inductor")
    steps = _steps(dit_inputs())
    first = _run(compiled, steps)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = _run(compiled, steps)
    assert dict(counters["graph_break"]) == {}
    eager = _run(tcpass.transform(model, plan), steps)
    for a, b, c in zip(first, second, eager, strict=True):
        assert_close(a, c, units=OTHER_KERNELS)
        assert_close(b, c, units=OTHER_KERNELS)


def test_propagation_exports_to_onnx_runtime(tmp_path):
    model = make_dit()
    forecast = ForecastSpec(kind="reuse", propagate=1.0)
    plan = CachePlan(keep_ratio=0.25, block_keep_ratio={1: 0.0}, schedule=EVERY_THIRD, forecast=forecast)
    export_onnx(tcpass.transform(model, plan), tmp_path / "onnx", null_label=1000)
    runtime = OrtTokenCacheRuntime(tmp_path / "onnx")
    eager = tcpass.transform(model, plan)
    g = torch.Generator().manual_seed(0)
    for t in TIMESTEPS:
        inputs = {
            "hidden_states": torch.randn(2, 4, 16, 16, generator=g),
            "timestep": torch.full((2,), t),
            "class_labels": torch.tensor([3, 1000]),
        }
        with torch.no_grad():
            want = eager(**inputs).sample.numpy()
        got = runtime(**{k: v.numpy() for k, v in inputs.items()})
        assert_close(got, want, units=OTHER_KERNELS, what=f"t={t}")
    assert runtime.step_counts[StepKind.CACHED] == 5


def test_propagation_settings_are_checked():
    plan = CachePlan(forecast=ForecastSpec(kind="anchored", order=1, propagate=0.25))
    assert CachePlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match=r"forecast.propagate = 1.5: expected a fraction in \[0, 1\]"):
        ForecastSpec(kind="reuse", propagate=1.5)
    with pytest.raises(ValueError, match="forecast.propagate = 'a lot': type error"):
        ForecastSpec(kind="reuse", propagate="a lot")


@pytest.mark.parametrize("text", ["reuse", "taylor:1", "taylor:2+0.5", "reuse+1", "anchored:1+0.25"])
def test_the_cli_names_propagation_and_reads_its_names_back(text):
    from tcpass.plan import forecast_name, parse_forecast

    spec = parse_forecast(text)
    assert forecast_name(spec) == text and (spec is None or spec.propagate == float(text.partition("+")[2] or 0))
    with pytest.raises(ValueError, match="optionally \\+W for cluster propagation"):
        parse_forecast(text.partition("+")[0] + "+much")
