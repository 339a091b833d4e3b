"""The ``anchored`` forecaster: each pruned token's last residual moved along its block's trend over FULL steps.

The golden test checks the graphs against an eager reference written here (numpy polynomial fits over
the FULL steps' residuals, per token), nothing shared with the graph's Newton form.
"""

import copy

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import tcpass
from tcpass import CachePlan, ForecastSpec, StepKind
from tcpass.export.onnx_export import export_onnx
from tcpass.export.ort_runtime import OrtTokenCacheRuntime
from tests.conftest import dit_inputs, make_dit
from tests.reference import _put_rows, _rows, dit_block_on_kept
from tests.test_forecast_taylor import BLOCKS, EVERY_THIRD, KEEP, REUSED_BLOCK, TIMESTEPS, _run, _static_plan, _steps
from tests.tolerance import OTHER_KERNELS, REGROUPED, assert_close


class AnchoredReference:
    """Eager: per block the FULL steps' residuals (newest first, at most ``order + 1``), per token the
    timestep and residual of its last computation; forecast ``d + P(t) - P(s)`` with ``P`` fitted by numpy."""

    def __init__(self, model, order, select):
        self.model, self.order, self.select = model, order, select
        self.fulls: dict[int, list] = {}  # block -> [(timestep, residual [B, N, D])]
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (stamp [B, N], residual)

    def forecast(self, b, t):
        stamps = np.array([s for s, _ in self.fulls[b]], dtype=np.float64)
        values = np.stack([r.double().numpy() for _, r in self.fulls[b]])  # [H, B, N, D]
        fit = np.polyfit(stamps - t, values.reshape(len(stamps), -1), len(stamps) - 1)  # centred at t
        s, d = self.last[b]

        def poly(x):  # P at x (shape [B, N]), x measured from t
            powers = np.stack([x**p for p in range(len(stamps) - 1, -1, -1)])  # [deg + 1, B, N]
            coeffs = fit.reshape(len(stamps), *values.shape[1:])  # [deg + 1, B, N, D]
            return (coeffs * powers[..., None]).sum(0)

        shift = poly(np.zeros(s.shape)) - poly(s.double().numpy() - t)
        return (d.double() + torch.from_numpy(shift)).float()

    def __call__(self, inputs, full, step):
        t = float(inputs["timestep"][0])

        def hook_for(b):
            def hook(block, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                if full:
                    residual = output - x
                    self.fulls[b] = [(t, residual.clone()), *self.fulls.get(b, [])][: self.order + 1]
                    self.last[b] = (torch.full(x.shape[:2], t), residual.clone())
                    return output
                forecast = self.forecast(b, t)
                idx = self.select(b, step, x.shape[0])
                if idx is None:
                    return x + forecast
                tl = kwargs["timestep"], kwargs["class_labels"]
                x_kept = _rows(x, idx)
                y_kept = dit_block_on_kept(block, x_kept, lambda _n: block.norm1(x, *tl, hidden_dtype=x.dtype)[0], *tl)
                s, d = self.last[b]
                self.last[b] = (
                    _put_rows(s, idx, torch.full(idx.shape, t)),
                    _put_rows(d, idx, y_kept - x_kept),
                )
                return x + _put_rows(forecast, idx, y_kept - x_kept)

            return hook

        handles = [
            self.model.transformer_blocks[b].register_forward_hook(hook_for(b), with_kwargs=True) for b in BLOCKS
        ]
        try:
            with torch.no_grad():
                return self.model(**inputs).sample
        finally:
            for h in handles:
                h.remove()


@pytest.mark.parametrize("order", [1, 2])
def test_anchored_forecast_matches_an_eager_reference(tmp_path, order):
    model = make_dit()
    plan, scores = _static_plan(tmp_path, ForecastSpec(kind="anchored", order=order))
    steps = _steps(dit_inputs())
    tm = tcpass.transform(model, plan)
    got = _run(tm, steps)
    assert tm.step_counts == {StepKind.FULL: 3, StepKind.CACHED: 5}

    def select(b, step, batch):
        return None if b == REUSED_BLOCK else scores[BLOCKS.index(b), step].topk(KEEP).indices.expand(batch, KEEP)

    reference = AnchoredReference(copy.deepcopy(model), order, select)
    want = [reference(s, full=i % 3 == 0, step=i) for i, s in enumerate(steps)]
    for i in range(len(TIMESTEPS)):
        assert_close(got[i], want[i], units=REGROUPED, what=f"step {i} (t={TIMESTEPS[i]})")
    reused = _run(tcpass.transform(model, CachePlan(**{**plan.__dict__, "forecast": None})), steps)
    assert (got[4] - reused[4]).abs().max() > 1e-3, "after two FULL steps the forecast must differ from reuse"


def test_anchored_compiles_once_and_exports(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    model = make_dit()
    plan = CachePlan(
        keep_ratio=0.25, block_keep_ratio={1: 0.0}, attention="cached_kv", schedule=EVERY_THIRD,
        forecast=ForecastSpec(kind="anchored", order=2),
    )  # fmt: skip
    # the latents move between steps, as in sampling (equal block inputs would tie input_change's scores)
    steps = [
        {**s, "hidden_states": dit_inputs(seed=10 + i)["hidden_states"]} for i, s in enumerate(_steps(dit_inputs()))
    ]
    compiled = tcpass.transform(model, plan, backend="inductor")
    first = _run(compiled, steps)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = _run(compiled, steps)
    assert dict(counters["graph_break"]) == {}
    eager = _run(tcpass.transform(model, plan), steps)
    export_onnx(tcpass.transform(model, plan), tmp_path / "onnx", null_label=1000)
    runtime = OrtTokenCacheRuntime(tmp_path / "onnx")
    for generation in range(2):
        got = [runtime(**{k: v.numpy() for k, v in s.items()}) for s in steps]
        for i, (a, b, c, d) in enumerate(zip(first, second, eager, got, strict=True)):
            assert_close(a, c, units=OTHER_KERNELS, what=f"inductor, step {i}")
            assert_close(b, c, units=OTHER_KERNELS, what=f"inductor again, step {i}")
            assert_close(d, c.numpy(), units=OTHER_KERNELS, what=f"ONNX Runtime generation {generation}, step {i}")


def test_anchored_settings_are_checked():
    with pytest.raises(ValueError, match=r"forecast.order = 3: the anchored forecast has orders \(1, 2\)"):
        ForecastSpec(kind="anchored", order=3)
