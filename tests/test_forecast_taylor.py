"""Token-level forecasting (`tcpass.forecasters`): a pruned token's residual extrapolated from its own history.

The golden test checks the graphs against an eager reference written here: per-token histories kept as
Python lists and extrapolated by a polynomial fit (numpy), nothing shared with the graph's Newton form.
"""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import tcpass
from tcpass import CachePlan, ForecastSpec, SelectorSpec, StepKind, TPRRSchedule
from tcpass.export.onnx_export import export_onnx
from tcpass.export.ort_runtime import OrtTokenCacheRuntime
from tcpass.selectors import StaticScoreSelector
from tests.conftest import dit_inputs, make_dit
from tests.reference import _put_rows, _rows, dit_block_on_kept
from tests.tolerance import OTHER_KERNELS, REGROUPED, assert_close

# one generation: FULL every third call (900, 600, 300), CACHED between
TIMESTEPS = (900, 800, 700, 600, 500, 400, 300, 200)
EVERY_THIRD = TPRRSchedule(boundary_timestep=0, intervals=(3, 3))
BLOCKS = (0, 1, 2)
REUSED_BLOCK = 1  # K = 0: the whole block's residual is forecast
N_TOKENS, KEEP = 64, 16


def _static_plan(tmp_path, forecast, attention="full_kv"):
    """Kept tokens from a score table that changes at every timestep, so tokens build up unequal histories."""
    scores = torch.randn(len(BLOCKS), len(TIMESTEPS), N_TOKENS, generator=torch.Generator().manual_seed(3))
    table = StaticScoreSelector(scores, torch.tensor(TIMESTEPS, dtype=torch.float32), torch.tensor(BLOCKS))
    digest = table.save(tmp_path / "scores.safetensors")
    plan = CachePlan(
        blocks=BLOCKS,
        keep_ratio=KEEP / N_TOKENS,
        block_keep_ratio={REUSED_BLOCK: 0.0},
        attention=attention,
        schedule=EVERY_THIRD,
        selector=SelectorSpec(kind="static", path=str(tmp_path / "scores.safetensors"), sha256=digest),
        forecast=forecast,
    )
    return plan, scores


def _steps(inputs, timesteps=TIMESTEPS):
    return [{**inputs, "timestep": torch.full_like(inputs["timestep"], t)} for t in timesteps]


def _run(model, steps):
    with torch.no_grad():
        return [model(**s).sample for s in steps]


class ForecastReference:
    """Eager TokenCache over an unmodified DiT with per-token forecasting (``full_kv`` attention).

    Each token of each cached block keeps a list of ``(timestep, residual)`` newest first, at most
    ``order + 1`` long; its forecast at ``t`` is the polynomial of degree ``len - 1`` through them.
    """

    def __init__(self, model, order, select):
        self.model, self.order, self.select = model, order, select
        self.history: dict[int, list[list[list]]] = {}  # block -> [batch row][token] -> [(t, residual)]

    def forecast(self, b, t):
        rows = []
        for tokens in self.history[b]:
            out = []
            for entries in tokens:
                stamps = np.array([s for s, _ in entries], dtype=np.float64) - t  # centred at t
                values = np.stack([r.double().numpy() for _, r in entries])
                fit = np.polyfit(stamps, values, len(entries) - 1)
                out.append(torch.from_numpy(fit[-1]))  # the polynomial's value at t
            rows.append(torch.stack(out))
        return torch.stack(rows).float()

    def latest(self, b):
        """Every token's newest residual [B, N, D]: what the graph's ``delta`` cache holds before the step."""
        return torch.stack([torch.stack([tokens[0][1] for tokens in row]) for row in self.history[b]])

    def refine(self, forecast, latest, idx, fresh):
        """The pruned tokens' residuals once the kept ones are computed (`tests.test_propagation` spreads)."""
        return forecast

    def remember(self, b, t, residual, idx=None):
        for row, tokens in enumerate(self.history[b]):
            for j, token in enumerate(range(residual.shape[1]) if idx is None else idx[row].tolist()):
                entry = (float(t), residual[row, j].clone())
                tokens[token] = [entry, *tokens[token]][: self.order + 1]

    def __call__(self, inputs, full, step):
        t = int(inputs["timestep"][0])

        def hook_for(b):
            def hook(block, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                if full:
                    self.history.setdefault(b, [[[] for _ in range(x.shape[1])] for _ in range(x.shape[0])])
                    self.remember(b, t, output - x)
                    return output
                forecast, latest = self.forecast(b, t), self.latest(b)
                idx = self.select(b, step, x.shape[0])
                if idx is None:
                    return x + forecast
                x_kept = _rows(x, idx)
                y_kept = dit_block_on_kept(
                    block, x_kept, lambda _n: block.norm1(x, *_tl(kwargs), hidden_dtype=x.dtype)[0], *_tl(kwargs)
                )
                fresh = y_kept - x_kept
                self.remember(b, t, fresh, idx)
                return x + _put_rows(self.refine(forecast, latest, idx, fresh), idx, fresh)

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


def _tl(kwargs):
    return kwargs["timestep"], kwargs["class_labels"]


@pytest.mark.parametrize("order", [1, 2])
def test_taylor_forecast_matches_an_eager_reference(tmp_path, order):
    model = make_dit()
    plan, scores = _static_plan(tmp_path, ForecastSpec(kind="taylor", order=order))
    steps = _steps(dit_inputs())
    tm = tcpass.transform(model, plan)
    got = _run(tm, steps)
    assert tm.step_counts == {StepKind.FULL: 3, StepKind.CACHED: 5}

    def select(b, step, batch):
        return None if b == REUSED_BLOCK else scores[BLOCKS.index(b), step].topk(KEEP).indices.expand(batch, KEEP)

    reference = ForecastReference(copy.deepcopy(model), order, select)
    fulls = [i % 3 == 0 for i in range(len(TIMESTEPS))]
    want = [reference(s, full=f, step=i) for i, (s, f) in enumerate(zip(steps, fulls, strict=True))]
    for i in range(len(TIMESTEPS)):
        assert_close(got[i], want[i], units=REGROUPED, what=f"step {i} (t={TIMESTEPS[i]})")
    reused = _run(tcpass.transform(model, dataclasses.replace(plan, forecast=None)), steps)
    assert (got[2] - reused[2]).abs().max() > 1e-3, "the forecast must differ from reuse once tokens have history"


def test_the_first_cached_step_has_no_history_and_reuses():
    """Right after the generation's first FULL step every token has one entry: the forecast is reuse."""
    model = make_dit()
    steps = _steps(dit_inputs(), TIMESTEPS[:2])
    plan = CachePlan(keep_ratio=0.25, schedule=EVERY_THIRD)
    reused = _run(tcpass.transform(model, plan), steps)
    forecast = _run(
        tcpass.transform(model, dataclasses.replace(plan, forecast=ForecastSpec(kind="taylor", order=2))), steps
    )
    assert_close(forecast[1], reused[1], units=REGROUPED)


def test_histories_never_reach_across_generations(tmp_path):
    model = make_dit()
    plan, _ = _static_plan(tmp_path, ForecastSpec(kind="taylor", order=2))
    steps = _steps(dit_inputs())
    tm = tcpass.transform(model, plan)
    first, second = _run(tm, steps), _run(tm, steps)
    for a, b in zip(first, second, strict=True):
        assert_close(a, b, units=REGROUPED)
    # reset, then a generation starting below the last one's timesteps: nothing of it is remembered
    later = _steps(dit_inputs(seed=4), (500, 400, 300, 200))
    tm.reset()
    assert_close(_run(tm, later)[-1], _run(tcpass.transform(model, plan), later)[-1], units=REGROUPED)


def test_batch_rows_are_independent_under_forecasting():
    model = make_dit()
    plan = CachePlan(keep_ratio=0.25, schedule=EVERY_THIRD, forecast=ForecastSpec(kind="taylor", order=1))
    inputs = dit_inputs(batch=3)
    other = dit_inputs(batch=3, seed=7)
    changed = {k: torch.cat([inputs[k][:1], other[k][1:]]) for k in inputs}
    base = _run(tcpass.transform(model, plan), _steps(inputs))
    outs = _run(tcpass.transform(model, plan), _steps(changed))
    for a, b in zip(base, outs, strict=True):
        assert_close(a[0], b[0], units=REGROUPED)


def test_forecasting_compiles_once_without_graph_breaks():
    torch._dynamo.reset()
    counters.clear()
    model = make_dit()
    plan = CachePlan(
        keep_ratio=0.25, attention="cached_kv", schedule=EVERY_THIRD, forecast=ForecastSpec(kind="taylor", order=2)
    )
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


@pytest.mark.parametrize("attention", ["full_kv", "cached_kv"])
def test_forecasting_exports_to_onnx_runtime(tmp_path, attention):
    model = make_dit()
    plan = CachePlan(
        keep_ratio=0.25,
        block_keep_ratio={1: 0.0},
        attention=attention,
        schedule=EVERY_THIRD,
        forecast=ForecastSpec(kind="taylor", order=2),
    )
    export_onnx(tcpass.transform(model, plan), tmp_path / "onnx", null_label=1000)
    runtime = OrtTokenCacheRuntime(tmp_path / "onnx")
    eager = tcpass.transform(model, plan)
    g = torch.Generator().manual_seed(0)
    for generation in range(2):  # the second starts over: the runtime's history must be forgotten too
        for t in TIMESTEPS:
            inputs = {
                "hidden_states": torch.randn(2, 4, 16, 16, generator=g),
                "timestep": torch.full((2,), t),
                "class_labels": torch.tensor([3, 1000]),
            }
            with torch.no_grad():
                want = eager(**inputs).sample.numpy()
            got = runtime(**{k: v.numpy() for k, v in inputs.items()})
            assert_close(got, want, units=OTHER_KERNELS, what=f"generation {generation}, t={t}")
    assert runtime.step_counts[StepKind.CACHED] == 10


def test_taylor_settings_are_checked():
    plan = CachePlan(forecast=ForecastSpec(kind="taylor", order=2))
    assert CachePlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match=r"forecast.order = 3: the taylor forecast has orders \(1, 2\)"):
        ForecastSpec(kind="taylor", order=3)


def test_forecast_caches_cost_what_the_order_says():
    """Order p keeps p older residuals and p + 1 timestamps per cached block, beside the block's own delta."""
    model = make_dit()
    inputs = dit_inputs()
    base = tcpass.transform(model, CachePlan(keep_ratio=0.25)).step_graphs(inputs)
    for order in (1, 2):
        graphs = tcpass.transform(
            model, CachePlan(keep_ratio=0.25, forecast=ForecastSpec(kind="taylor", order=order))
        ).step_graphs(inputs)
        extra = graphs.cache_bytes - base.cache_bytes
        residual, stamp = 2 * N_TOKENS * 32 * 4, 2 * N_TOKENS * 4  # [B, N, D] and [B, N] float32
        assert extra == 3 * (order * residual + (order + 1) * stamp)
        assert math.isclose(len(graphs.full.carried), 3 * 2 * order)
