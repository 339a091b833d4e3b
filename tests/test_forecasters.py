"""The forecaster registry (`tcpass.forecasters`): what a pruned token gets is one registered class.

Each forecaster has its own test file (``tests/test_forecast_<kind>.py``); this one checks the engine:
plans name forecasters by kind and round-trip, ``reuse`` is what a plan without ``forecast`` does, and a
new forecaster defined here (a toy) runs through the passes with nothing else changed.
"""

import dataclasses

import pytest
import torch

import tcpass
from tcpass import CachePlan, ForecastSpec, TPRRSchedule
from tcpass.forecasters import FORECASTERS, TokenForecaster, register_forecaster
from tests.conftest import dit_inputs, make_dit
from tests.tolerance import EXACT, REGROUPED, assert_close

TIMESTEPS = (900, 800, 700)
EVERY_THIRD = TPRRSchedule(boundary_timestep=0, intervals=(3, 3))


def _run(model, inputs, timesteps=TIMESTEPS):
    with torch.no_grad():
        return [model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)}).sample for t in timesteps]


def test_plans_name_forecasters_and_round_trip():
    plan = CachePlan(forecast=ForecastSpec(kind="reuse"))
    assert CachePlan.from_json(plan.to_json()) == plan
    assert CachePlan.from_json(CachePlan().to_json()).forecast is None
    assert "reuse" in FORECASTERS
    with pytest.raises(ValueError, match=r"forecast.kind = 'cubic' is unknown; expected one of \("):
        ForecastSpec(kind="cubic")
    with pytest.raises(ValueError, match=r"forecast.order = 'two': type error"):
        ForecastSpec(kind="reuse", order="two")
    with pytest.raises(ValueError, match=r"plan.forecast.*horizon"):
        CachePlan.from_dict({"forecast": {"kind": "reuse", "horizon": 2}})


def test_reuse_is_what_a_plan_without_forecast_does():
    model = make_dit()
    plan = CachePlan(keep_ratio=0.25, block_keep_ratio={1: 0.0}, schedule=EVERY_THIRD)
    plain = _run(tcpass.transform(model, plan), dit_inputs())
    named = _run(tcpass.transform(model, dataclasses.replace(plan, forecast=ForecastSpec(kind="reuse"))), dit_inputs())
    for a, b in zip(plain, named, strict=True):
        assert_close(a, b, units=EXACT)


def test_a_forecaster_is_one_registered_class():
    """What adding a forecaster takes: a `TokenForecaster` subclass registered by decorator; plans name it."""

    @register_forecaster
    class Halved(TokenForecaster):
        """Pruned tokens take half their cached residual (a toy)."""

        kind = "halved"

        def predict(self, em, block, caches, timestep):
            return em(torch.ops.aten.mul.Tensor, (caches[f"block{block}.delta"], 0.5))

    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_forecaster(type("Other", (TokenForecaster,), {"kind": "halved"}))
        model = make_dit()
        inputs = dit_inputs()
        plan = CachePlan(keep_ratio=0.0, schedule=EVERY_THIRD, forecast=ForecastSpec(kind="halved"))
        got = _run(tcpass.transform(model, plan), inputs, TIMESTEPS[:2])

        # Eager: each block's residual at the FULL step, then every block outputs x + residual / 2.
        residuals, handles = {}, []
        for b, block in enumerate(model.transformer_blocks):

            def hook(block, args, kwargs, output, b=b):
                x = args[0] if args else kwargs["hidden_states"]
                if b not in residuals:
                    residuals[b] = output - x
                    return output
                return x + 0.5 * residuals[b]

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
        try:
            want = _run(model, inputs, TIMESTEPS[:2])
        finally:
            for h in handles:
                h.remove()
        assert_close(got[0], want[0], units=REGROUPED)
        assert_close(got[1], want[1], units=REGROUPED)
    finally:
        FORECASTERS.pop("halved", None)
