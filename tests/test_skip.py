"""SKIP steps: whole calls whose block stack is not run, from a calibrated timestep table.

The reference is written here with hooks on the diffusers model, without the passes: at a computed
call it records ``last block out - block 0 in``; at a skipped call it replaces the last block's
output with ``block 0 in + scale * recorded residual`` (``level="stack"``), or returns ``scale *`` the
last computed output (``level="output"``).
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import tcpass
from tcpass import CachePlan, StepKind, StepSkip, TPRRSchedule
from tcpass.sampling import ddim_sample, ddim_timesteps
from tcpass.schedule import simulate
from tests.conftest import make_dit
from tests.tolerance import EXACT, OTHER_KERNELS, REGROUPED, assert_close

STEPS = 12


def timesteps(num_steps=STEPS):
    return ddim_timesteps(num_steps)


def generate(model, seed, num_steps=STEPS, batch=2):
    noise = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(1, batch + 1)
    return ddim_sample(model, noise, labels, null_label=1000, num_steps=num_steps, guidance_scale=4.0)


class SkipReference(torch.nn.Module):
    """The skip semantics on the eager diffusers model, via hooks (independent of the passes)."""

    def __init__(self, model, skip: StepSkip):
        super().__init__()
        self.model, self.skip, self.config = model, skip, model.config
        self.residual = self.last_output = self.stack_in = None
        self.scale = None
        blocks = model.transformer_blocks
        blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True)
        blocks[-1].register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.stack_in = args[0] if args else kwargs["hidden_states"]

    def _post(self, module, args, kwargs, output):
        if self.scale is None:
            self.residual = output - self.stack_in
            return output
        return self.stack_in + self.scale * self.residual

    def forward(self, hidden_states, timestep, class_labels):
        t = float(timestep[0])
        first = self.last_output is None
        self.scale = None if first else self.skip.scale_at(t)
        if self.skip.level == "output" and self.scale is not None:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=self.scale * self.last_output)
        out = self.model(hidden_states, timestep=timestep, class_labels=class_labels)
        if self.scale is None:
            self.last_output = out.sample
        return out


@pytest.mark.parametrize("level", ["stack", "output"])
def test_skipped_generation_matches_reference(level):
    model = make_dit()
    ts = timesteps()
    skip = StepSkip(timesteps=ts[2:9:2] + [ts[9]], scales=[1.0, 0.9, 1.1, 1.0, 0.8], level=level)
    tm = tcpass.transform(model, CachePlan(blocks=(), skip=skip))
    out = generate(tm, seed=3)
    expected = generate(SkipReference(make_dit(), skip), seed=3)
    assert tm.step_counts[StepKind.SKIP] == 5 and tm.step_counts[StepKind.FULL] == STEPS - 5
    assert_close(out, expected, units=REGROUPED)
    # a skipped call really skips: the stack is gone from the SKIP graph, or everything is (output level)
    skip_graph = tm.step_graphs().skip.gm.graph
    block_nodes = [n for n in skip_graph.nodes if "transformer_blocks" in str(n.meta.get("nn_module_stack", ""))]
    if level == "output":
        assert [n.op for n in skip_graph.nodes if n.op == "call_function"] == ["call_function"]  # one mul
    else:
        assert all("norm1.emb" in str(n.meta["nn_module_stack"]) for n in block_nodes)  # only the final adaLN


def test_skip_composes_with_token_caching_and_reads_the_last_computed_residual():
    model = make_dit()
    ts = timesteps()
    skip = StepSkip(timesteps=[ts[3], ts[4], ts[8]], scales=[1.0, 1.2, 0.7])
    plan = CachePlan(keep_ratio=0.5, schedule=TPRRSchedule(intervals=(3, 3)), skip=skip)
    tm = tcpass.transform(model, plan)
    reference = SkipReference(make_dit(), skip)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kinds = []
    x = noise
    labels = torch.tensor([1, 1000])
    for t in ts:
        timestep = torch.full((2,), int(t))
        residual_before = tm.step_graphs().caches[0].clone() if tm.step_counts else None
        out = tm(x, timestep=timestep, class_labels=labels).sample
        kinds.append(tm.last_step.kind)
        if tm.last_step.kind is StepKind.SKIP:
            reference.residual, reference.scale = residual_before, skip.scale_at(t)
            reference.last_output = out  # not first: the reference skips too
            expected = reference.model(x, timestep=timestep, class_labels=labels).sample
            assert_close(out, expected, units=REGROUPED)
        x = x - 0.05 * out[:, :4]  # any trajectory works: each call is checked on its own inputs
    assert kinds == [s.kind for s in simulate(plan.schedule, ts, skip)]
    assert set(kinds) == {StepKind.FULL, StepKind.CACHED, StepKind.SKIP}
    # the call after a CACHED step that a SKIP follows reads what the CACHED step wrote
    assert kinds[2] is StepKind.CACHED and kinds[3] is StepKind.SKIP


def test_first_call_of_a_generation_is_never_skipped_and_generations_restart():
    model = make_dit()
    ts = timesteps()
    tm = tcpass.transform(model, CachePlan(blocks=(), skip=StepSkip(timesteps=[ts[0], ts[1]])))
    first = generate(tm, seed=0)
    assert tm.step_counts == {StepKind.FULL: STEPS - 1, StepKind.SKIP: 1}
    second = generate(tm, seed=0)
    assert_close(first, second, units=EXACT)  # nothing leaks from one generation to the next


def test_a_skip_plan_round_trips_and_rejects_bad_tables(tmp_path):
    plan = CachePlan(skip=StepSkip(timesteps=[980, 500.0], scales=[1.0, 0.95], level="output"))
    tcpass.save_plan(plan, tmp_path / "p.json")
    assert tcpass.load_plan(tmp_path / "p.json") == plan
    with pytest.raises(ValueError, match=r"skip.timesteps\[1\] = 1200"):
        StepSkip(timesteps=[10, 1200])
    with pytest.raises(ValueError, match="one factor per skip.timesteps entry"):
        StepSkip(timesteps=[10, 20], scales=[1.0])
    with pytest.raises(ValueError, match="skip.level = 'blocks'"):
        StepSkip(level="blocks")
    with pytest.raises(ValueError, match=r"plan.skip has unknown field\(s\) \['order'\]"):
        CachePlan.from_dict({"skip": {"timesteps": [1], "order": 2}})


def test_compiled_skip_plan_has_no_graph_breaks_or_recompiles_and_matches_eager():
    ts = timesteps()
    compiled = compile_and_compare(
        CachePlan(keep_ratio=0.5, skip=StepSkip(timesteps=ts[2::3], scales=[0.9] * len(ts[2::3])))
    )
    assert compiled.step_counts[StepKind.SKIP] == 2 * len(ts[2::3])  # both generations skipped their listed calls


def compile_and_compare(plan):
    """Compile ``plan`` with inductor: FULL, CACHED and SKIP graphs once each, no graph break, no
    recompile over a second generation, both generations within rounding of eager. Returns the model."""
    torch._dynamo.reset()
    counters.clear()
    model = make_dit()
    compiled = tcpass.transform(model, plan, backend="inductor")
    first = generate(compiled, seed=0)
    unique = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = generate(compiled, seed=1)
    assert dict(counters["graph_break"]) == {}
    assert unique == 3 and counters["stats"]["unique_graphs"] == unique  # FULL, CACHED, SKIP, once each
    eager = tcpass.transform(model, plan)
    for seed, got in enumerate((first, second)):
        want = generate(eager, seed)
        assert_close(got, want, units=OTHER_KERNELS, what=f"generation {seed}")
    return compiled


@pytest.mark.parametrize("level", ["stack", "output"])
def test_exported_skip_plan_matches_eager_every_step(tmp_path, level):
    ts = timesteps()
    plan = CachePlan(keep_ratio=0.5, skip=StepSkip(timesteps=ts[2::3], scales=[0.9] * len(ts[2::3]), level=level))
    runtime = export_and_compare_every_step(tmp_path, plan, generations=1)
    assert runtime.step_counts[StepKind.SKIP] == len(ts[2::3])


def export_and_compare_every_step(tmp_path, plan, generations):
    """Export ``plan`` on a tiny DiT and run ``generations`` of calls on ONNX Runtime and eagerly:
    every step within the ONNX Runtime budget, the same step kinds. Returns the ONNX runtime."""
    from tcpass.export.onnx_export import export_onnx
    from tcpass.export.ort_runtime import OrtTokenCacheRuntime

    model = make_dit()
    export_onnx(tcpass.transform(model, plan), tmp_path, null_label=1000)
    runtime = OrtTokenCacheRuntime(tmp_path)
    eager = tcpass.transform(model, plan)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 1000])
    for _ in range(generations):  # a later generation must not read an earlier one's caches
        for t in timesteps():
            x = torch.randn(2, 4, 16, 16, generator=g)
            inputs = {"hidden_states": x, "timestep": torch.full((2,), int(t)), "class_labels": labels}
            want = eager(**inputs).sample.numpy()
            got = runtime(**{k: v.numpy() for k, v in inputs.items()})
            assert_close(got, want, units=OTHER_KERNELS, what=f"timestep {t}")
    assert {k: runtime.step_counts[k] for k in StepKind} == {k: eager.step_counts[k] for k in StepKind}
    return runtime


# Forecasting SKIP steps: the residual is sum_k w[k] * (residual of the k-th last computed call) --------
class ForecastReference(torch.nn.Module):
    """Forecasting skips on the eager diffusers model (hooks, no passes): remembers every computed
    call's stack residual (or output) and predicts a skipped one as ``sum_k w[k] * history[-1 - k]``,
    skipping only once the generation has computed as many calls as ``w`` reads (up to its last nonzero
    weight: trailing zeros are residuals not computed yet)."""

    def __init__(self, model, skip: StepSkip):
        super().__init__()
        self.model, self.skip, self.config = model, skip, model.config
        self.history, self.outputs, self.weights = [], [], None
        self.computed, self.prev_t = 0, None
        blocks = model.transformer_blocks
        blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True)
        blocks[-1].register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.stack_in = args[0] if args else kwargs["hidden_states"]

    def _predict(self, values):
        return sum(w * values[-1 - k] for k, w in enumerate(self.weights) if w != 0)  # zeros: not computed yet

    def _post(self, module, args, kwargs, output):
        if self.weights is None:
            self.history.append(output - self.stack_in)
            return output
        return self.stack_in + self._predict(self.history)

    def forward(self, hidden_states, timestep, class_labels):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        t = float(timestep[0])
        if self.prev_t is None or t >= self.prev_t:  # a new generation
            self.history, self.outputs, self.computed = [], [], 0
        self.prev_t = t
        w = self.skip.weights_at(t)
        reads = max((k + 1 for k, v in enumerate(w or ()) if v != 0), default=1)
        self.weights = w if w is not None and self.computed >= reads else None
        if self.weights is not None and self.skip.level == "output":
            return Transformer2DModelOutput(sample=self._predict(self.outputs))
        out = self.model(hidden_states, timestep=timestep, class_labels=class_labels)
        if self.weights is None:
            self.outputs.append(out.sample)
            self.computed += 1
        return out


def forecast_table(level="stack", history=2):
    ts = timesteps()
    # ts[1] comes after a single computed call: with history 2 it must be computed, not skipped
    skipped = [ts[1], ts[3], ts[5], ts[6], ts[9]]
    rows = [[1.4, -0.4], [1.5, -0.5], [0.9, 0.2], [1.8, -0.7], [1.2, -0.25]]
    if history == 3:
        rows = [[*r, 0.05 * (i - 2)] for i, r in enumerate(rows)]
    return StepSkip(timesteps=skipped, weights=rows, level=level)


@pytest.mark.parametrize("level,history", [("stack", 2), ("stack", 3), ("output", 2)])
def test_forecast_generation_matches_reference(level, history):
    skip = forecast_table(level, history)
    tm = tcpass.transform(make_dit(), CachePlan(blocks=(), skip=skip))
    out = generate(tm, seed=5)
    expected = generate(ForecastReference(make_dit(), skip), seed=5)
    # ts[1] follows one computed call, so it is computed; ts[3] follows three (ts[0..2])
    assert tm.step_counts == {StepKind.FULL: STEPS - 4, StepKind.SKIP: 4}
    assert_close(out, expected, units=REGROUPED)
    # the forecast matters: the same table with plain reuse gives another result
    reuse = tcpass.transform(make_dit(), CachePlan(blocks=(), skip=StepSkip(timesteps=skip.timesteps, level=level)))
    assert (generate(reuse, seed=5) - out).abs().max() > 1e-3
    # a new generation forgets the old residuals: same noise, bit-identical result
    assert_close(generate(tm, seed=5), out, units=EXACT)


def early_forecast_table():
    ts = timesteps()
    # history 3: ts[1] comes after one computed call and ts[3] after two; their zeros stand for the residuals
    # not computed yet, so both are skipped (under a rule of "history computed calls first" neither would be)
    rows = [[1.3, 0.0, 0.0], [1.6, -0.6, 0.0], [1.5, -0.8, 0.3], [1.4, -0.6, 0.2]]
    return StepSkip(timesteps=[ts[1], ts[3], ts[5], ts[7]], weights=rows)


def test_a_forecast_early_in_a_generation_reads_only_the_residuals_computed_so_far(tmp_path):
    skip = early_forecast_table()
    tm = tcpass.transform(make_dit(), CachePlan(blocks=(), skip=skip))
    out = generate(tm, seed=5)
    assert tm.step_counts == {StepKind.FULL: STEPS - 4, StepKind.SKIP: 4}
    assert_close(out, generate(ForecastReference(make_dit(), skip), seed=5), units=REGROUPED)
    # the second generation's history buffers hold the first's residuals where its zeros are: weight 0 is
    # exactly nothing, so the same noise gives a bit-identical result
    assert_close(generate(tm, seed=5), out, units=EXACT)
    # a nonzero weight on a residual not computed yet: that call is computed
    ts = timesteps()
    needs_two = StepSkip(timesteps=[ts[1], ts[3]], weights=[[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]])
    skips = [s.kind is StepKind.SKIP for s in simulate(TPRRSchedule(), ts[:4], needs_two)]
    assert skips == [False, False, False, True]
    # ONNX Runtime decides and forecasts the same, over two generations
    runtime = export_and_compare_every_step(tmp_path, CachePlan(keep_ratio=0.5, skip=skip), generations=2)
    assert runtime.step_counts[StepKind.SKIP] == 8


def test_forecast_reads_residuals_written_by_cached_steps_and_rows_are_independent():
    ts = timesteps()
    skip = StepSkip(timesteps=[ts[3], ts[4], ts[8]], weights=[[1.5, -0.5], [2.0, -1.0], [0.7, 0.3]])
    plan = CachePlan(keep_ratio=0.5, schedule=TPRRSchedule(intervals=(3, 3)), skip=skip)
    tm = tcpass.transform(make_dit(), plan)
    reference = ForecastReference(make_dit(), skip)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 1000])
    history, kinds = [], []
    for t in ts:
        timestep = torch.full((2,), int(t))
        out = tm(x, timestep=timestep, class_labels=labels).sample
        kinds.append(tm.last_step.kind)
        if tm.last_step.kind is StepKind.SKIP:
            reference.history, reference.computed, reference.prev_t = list(history), len(history), float(t) + 1
            expected = reference(x, timestep=timestep, class_labels=labels).sample
            assert_close(out, expected, units=REGROUPED)
        else:
            history.append(tm.step_graphs().caches[0].clone())  # what this FULL or CACHED call wrote
        x = x - 0.05 * out[:, :4]
    assert kinds == [s.kind for s in simulate(plan.schedule, ts, skip)]
    assert kinds[2] is StepKind.CACHED and kinds[3] is StepKind.SKIP and kinds[4] is StepKind.SKIP
    # batch-row independence: rows 0-1 of a batch of 4 equal the same rows generated alone
    noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    both = ddim_sample(tcpass.transform(make_dit(), plan), noise, torch.arange(4), 1000, STEPS, 4.0)
    alone = ddim_sample(tcpass.transform(make_dit(), plan), noise[:2], torch.arange(2), 1000, STEPS, 4.0)
    assert_close(both[:2], alone, units=OTHER_KERNELS)


def test_forecast_tables_are_checked_and_round_trip(tmp_path):
    skip = forecast_table(history=3)
    plan = CachePlan(skip=skip)
    tcpass.save_plan(plan, tmp_path / "p.json")
    assert tcpass.load_plan(tmp_path / "p.json") == plan and skip.history == 3
    with pytest.raises(ValueError, match="scales and skip.weights are both set"):
        StepSkip(timesteps=[10], scales=[1.0], weights=[[1.0]])
    with pytest.raises(ValueError, match="one weight list per skip.timesteps entry"):
        StepSkip(timesteps=[10, 20], weights=[[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"skip.weights\[1\] has 1 weights"):
        StepSkip(timesteps=[10, 20], weights=[[1.0, 0.0], [1.0]])
    with pytest.raises(ValueError, match=r"skip.weights\[0\] has 5 weights"):
        StepSkip(timesteps=[10], weights=[[1.0] * 5])
    with pytest.raises(ValueError, match=r"skip.weights\[0\]\[1\] = nan"):
        StepSkip(timesteps=[10], weights=[[1.0, float("nan")]])
    with pytest.raises(ValueError, match=r"skip.weights\[0\]\[0\]"):
        StepSkip(timesteps=[10], weights=[["1"]])


def test_compiled_forecast_plan_has_no_graph_breaks_or_recompiles_and_matches_eager():
    compiled = compile_and_compare(CachePlan(keep_ratio=0.5, skip=forecast_table(history=3)))
    assert compiled.step_counts[StepKind.SKIP] == 8  # 4 per generation


@pytest.mark.parametrize("level", ["stack", "output"])
def test_exported_forecast_plan_matches_eager_every_step(tmp_path, level):
    plan = CachePlan(keep_ratio=0.5, skip=forecast_table(level, history=3))
    runtime = export_and_compare_every_step(tmp_path, plan, generations=2)
    assert runtime.step_counts[StepKind.SKIP] == 8  # 4 per generation


def test_wan_stack_skip_drops_the_blocks_and_matches_a_hook_reference():
    """Wan's attention writes its rotary output into an ``empty_like`` in place: a SKIP graph must still drop
    every block (a write into a tensor nothing reads any more is dead), and equal ``block 0 in + scale *
    the last computed residual`` recorded by hooks on the eager model."""
    from tests.families import family_inputs, make_wan

    model = make_wan()
    skip = StepSkip(timesteps=[800.0], scales=[0.9], level="stack")
    tm = tcpass.transform(model, CachePlan(blocks=(), skip=skip), example_inputs=family_inputs("wan"))
    state = {}

    def pre(module, args, kwargs):
        state["in"] = args[0] if args else kwargs["hidden_states"]

    def post(module, args, kwargs, output):
        if state.get("scale") is None:
            state["residual"] = output - state["in"]
            return output
        return state["in"] + state["scale"] * state["residual"]

    hooks = [
        model.blocks[0].register_forward_pre_hook(pre, with_kwargs=True),
        model.blocks[-1].register_forward_hook(post, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            for i, (t, scale) in enumerate(((0.9, None), (0.8, 0.9), (0.7, None))):
                inputs = family_inputs("wan", t=t, seed=i)
                got = tm(**inputs, return_dict=False)[0]
                state["scale"] = scale
                want = model(**inputs, return_dict=False)[0]
                assert_close(got, want, units=REGROUPED, what=f"call {i}")
                if scale is not None:
                    skipped = got
            state["scale"] = None
            computed = model(**family_inputs("wan", t=0.8, seed=1), return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert tm.step_counts[StepKind.SKIP] == 1
    skip_graph = tm.step_graphs().skip.gm.graph
    assert not [n for n in skip_graph.nodes if "blocks." in str(n.meta.get("nn_module_stack", ""))]
    assert (computed - skipped).abs().max() > 1e-3, "a skipped call must differ from computing it"
