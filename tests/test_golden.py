"""Golden-output tests: transformed graphs vs the eager model and vs an independent reference."""

import copy
import math

import pytest
import torch

import tcpass
from tcpass import CachePlan, ForecastSpec, SelectorSpec, StepKind, StepSkip, TPRRSchedule
from tcpass.selectors import StaticScoreSelector
from tests.conftest import dit_inputs, make_dit
from tests.reference import ReferenceTokenCache, dynamic_predictor_reference, topk_input_change
from tests.tolerance import REGROUPED, assert_close

MODES = ("full_kv", "cached_kv", "kept_only")
TIMESTEPS = (900, 800, 700)  # one generation: FULL, CACHED, CACHED under ALL_PHASE0
ALL_PHASE0 = TPRRSchedule(boundary_timestep=0, intervals=(3, 3))


def run(model, inputs, timesteps=TIMESTEPS):
    outs = []
    with torch.no_grad():
        for t in timesteps:
            step_inputs = {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}
            outs.append(model(**step_inputs).sample)
    return outs


def test_no_cache_plan_equals_eager(dit):
    inputs = dit_inputs()
    tm = tcpass.transform(dit, CachePlan.no_cache())
    for got, want in zip(run(tm, inputs), run(dit, inputs), strict=True):
        assert_close(got, want, units=REGROUPED)


@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("selector", ["input_change", "random"])
def test_keep_all_tokens_equals_eager(dit, attention, selector):
    plan = CachePlan(keep_ratio=1.0, attention=attention, selector=SelectorSpec(kind=selector), schedule=ALL_PHASE0)
    tm = tcpass.transform(dit, plan)
    outs = run(tm, dit_inputs())
    assert tm.step_counts[StepKind.CACHED] == 2
    for got, want in zip(outs, run(dit, dit_inputs()), strict=True):
        assert_close(got, want, units=REGROUPED)


@pytest.mark.parametrize("attention", MODES)
def test_cached_steps_match_reference_static_selector(dit, attention, tmp_path):
    blocks, keep_ratio = (0, 2), 0.25
    n_tokens = 64
    k = math.ceil(keep_ratio * n_tokens)
    scores = torch.randn(len(blocks), 3, n_tokens, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([900.0, 800.0, 700.0])
    table = StaticScoreSelector(scores, timesteps, torch.tensor(blocks))
    digest = table.save(tmp_path / "scores.safetensors")
    plan = CachePlan(
        blocks=blocks,
        keep_ratio=keep_ratio,
        attention=attention,
        schedule=ALL_PHASE0,
        selector=SelectorSpec(kind="static", path=str(tmp_path / "scores.safetensors"), sha256=digest),
    )
    tm = tcpass.transform(dit, plan)
    got = run(tm, dit_inputs())

    step = {"i": 0}

    def select(b, x, _state):
        row = int((timesteps - TIMESTEPS[step["i"]]).abs().argmin())
        return scores[blocks.index(b), row].topk(k).indices.expand(x.shape[0], k)

    ref = ReferenceTokenCache(copy.deepcopy(dit), blocks, attention, select)
    inputs = dit_inputs()
    for i, t in enumerate(TIMESTEPS):
        step["i"] = i
        want = ref({**inputs, "timestep": torch.full_like(inputs["timestep"], t)}, full=(i == 0))
        assert_close(got[i], want, units=REGROUPED, what=f"step {i}")
    assert (got[2] - run(dit, inputs)[2]).abs().max() > 1e-3, "caching 3/4 of the tokens must change the output"


@pytest.mark.parametrize("attention", MODES)
def test_cached_steps_match_reference_input_change_selector(dit, attention):
    blocks, keep_ratio = (1, 2), 0.25
    plan = CachePlan(blocks=blocks, keep_ratio=keep_ratio, attention=attention, schedule=ALL_PHASE0)
    tm = tcpass.transform(dit, plan)
    got = run(tm, dit_inputs())
    ref = ReferenceTokenCache(copy.deepcopy(dit), blocks, attention, topk_input_change(16))
    inputs = dit_inputs()
    for i, t in enumerate(TIMESTEPS):
        want = ref({**inputs, "timestep": torch.full_like(inputs["timestep"], t)}, full=(i == 0))
        assert_close(got[i], want, units=REGROUPED, what=f"step {i}")


def _reference_run(dit, blocks, attention, select, **kw):
    ref = ReferenceTokenCache(copy.deepcopy(dit), blocks, attention, select, **kw)
    inputs = dit_inputs()
    return [
        ref({**inputs, "timestep": torch.full_like(inputs["timestep"], t)}, full=(i == 0))
        for i, t in enumerate(TIMESTEPS)
    ]


@pytest.mark.parametrize("attention", MODES)
def test_cached_steps_match_reference_toca_selector(dit, attention):
    blocks = (0, 2)
    plan = CachePlan(
        blocks=blocks, keep_ratio=0.25, attention=attention, schedule=ALL_PHASE0, selector=SelectorSpec(kind="toca")
    )
    got = run(tcpass.transform(dit, plan), dit_inputs())
    want = _reference_run(dit, blocks, attention, lambda b, x, st: st["score"].topk(16, dim=1).indices, toca=True)
    for i in range(3):
        assert_close(got[i], want[i], units=REGROUPED, what=f"step {i}")
    assert (got[2] - run(dit, dit_inputs())[2]).abs().max() > 1e-3


@pytest.mark.parametrize("attention", MODES)
def test_cached_steps_match_reference_dynamic_predictor(dit, attention, tmp_path):
    from tcpass.predictor import DynamicPredictor, save_predictor

    torch.manual_seed(5)
    predictor = DynamicPredictor(hidden_size=32, num_blocks=3, width=8)
    torch.nn.init.normal_(predictor.out.weight)
    torch.nn.init.normal_(predictor.gain)
    digest = save_predictor(predictor, tmp_path / "predictor.safetensors")
    blocks = (1, 2)
    plan = CachePlan(
        blocks=blocks,
        keep_ratio=0.25,
        attention=attention,
        schedule=ALL_PHASE0,
        selector=SelectorSpec(kind="dynamic", path=str(tmp_path / "predictor.safetensors"), sha256=digest),
    )
    base = dit_inputs()
    drift = torch.randn(base["hidden_states"].shape, generator=torch.Generator().manual_seed(9))
    steps = [  # the latents move between steps, as in sampling: the predictor scores that change
        {
            **base,
            "hidden_states": base["hidden_states"] + 0.3 * i * drift,
            "timestep": torch.full_like(base["timestep"], t),
        }
        for i, t in enumerate(TIMESTEPS)
    ]
    tm = tcpass.transform(dit, plan)
    with torch.no_grad():
        got = [tm(**step).sample for step in steps]

    # Independent: the predictor applied eagerly to block 0's input, captured by a hook.
    reference = dynamic_predictor_reference(copy.deepcopy(dit), predictor, blocks, attention, 16)
    want = [reference(step, full=(i == 0)) for i, step in enumerate(steps)]
    for i in range(3):
        assert_close(got[i], want[i], units=REGROUPED, what=f"step {i}")
    with torch.no_grad():
        assert (got[2] - dit(**steps[2]).sample).abs().max() > 1e-3


def test_whole_block_reuse_matches_reference(dit):
    """keep_ratio 0 (FORA-style): the block is skipped at CACHED steps, x + its cached residual."""
    plan = CachePlan(blocks=(0, 1), keep_ratio=0.25, block_keep_ratio={1: 0.0}, schedule=ALL_PHASE0)
    tm = tcpass.transform(dit, plan)
    got = run(tm, dit_inputs())
    k16 = topk_input_change(16)
    want = _reference_run(dit, (0, 1), "full_kv", lambda b, x, st: None if b == 1 else k16(b, x, st))
    for i in range(3):
        assert_close(got[i], want[i], units=REGROUPED, what=f"step {i}")
    graphs = tm.step_graphs()

    def linears(gm):
        return sum(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)

    block_linears = sum(isinstance(m, torch.nn.Linear) for m in dit.transformer_blocks[1].modules())
    assert linears(graphs.full.gm) - linears(graphs.cached[0].gm) == block_linears, "block 1 must not run"


@pytest.mark.parametrize("selector", ["input_change", "random"])
def test_batch_rows_are_independent(dit, selector):
    plan = CachePlan(keep_ratio=0.25, selector=SelectorSpec(kind=selector), schedule=ALL_PHASE0)
    inputs = dit_inputs(batch=3)
    base = run(tcpass.transform(dit, plan), inputs)
    other = dit_inputs(batch=3, seed=7)
    changed = {k: torch.cat([inputs[k][:1], other[k][1:]]) for k in inputs}
    outs = run(tcpass.transform(dit, plan), changed)
    for a, b in zip(base, outs, strict=True):
        assert_close(a[0], b[0], units=REGROUPED)
        assert (a[1:] - b[1:]).abs().max() > 1e-3
    if selector == "input_change":  # content-based selection follows a row wherever it sits
        perm = torch.tensor([2, 0, 1])
        permuted = run(tcpass.transform(dit, plan), {k: v[perm] for k, v in inputs.items()})
        for a, b in zip(base, permuted, strict=True):
            assert_close(a[perm], b, units=REGROUPED)


@pytest.mark.parametrize("selector", ["input_change", "random"])
def test_caches_reset_between_generations(dit, selector):
    plan = CachePlan(keep_ratio=0.25, selector=SelectorSpec(kind=selector), schedule=ALL_PHASE0)
    first, second = dit_inputs(seed=1), dit_inputs(seed=2)
    tm = tcpass.transform(dit, plan)
    run(tm, first)
    again = run(tm, second)  # timestep goes back up: a new generation, detected without a step count
    fresh = run(tcpass.transform(dit, plan), second)
    for a, b in zip(again, fresh, strict=True):
        assert_close(a, b, units=REGROUPED)
    run(tm, first, timesteps=(900, 800))
    tm.reset()
    after_reset = run(tm, second, timesteps=(700, 600, 500))
    fresh = run(tcpass.transform(dit, plan), second, timesteps=(700, 600, 500))
    for a, b in zip(after_reset, fresh, strict=True):
        assert_close(a, b, units=REGROUPED)


@pytest.mark.parametrize("attention", MODES)
def test_every_graph_lints_and_cached_blocks_run_on_kept_tokens(dit, attention):
    plan = CachePlan(blocks=(0, 1), keep_ratio=0.25, attention=attention)
    graphs = tcpass.transform(dit, plan).step_graphs()
    aten = torch.ops.aten
    for step_graph in [graphs.full, *graphs.cached.values()]:
        step_graph.gm.graph.lint()
    gm = graphs.cached[0].gm
    rows = {}
    for node in gm.graph.nodes:
        stack = str(node.meta.get("nn_module_stack", {}))
        if node.target is aten.linear.default and "transformer_blocks.0.attn1" in stack:
            rows[str(node.args[1])] = node.meta["val"].shape[1]
    k_rows = {w: n for w, n in rows.items() if n == 16}
    full_rows = {w: n for w, n in rows.items() if n == 64}
    assert len(rows) == 4  # q, k, v, out projections, each computed once
    if attention == "full_kv":
        assert sorted(full_rows) == ["transformer_blocks_0_attn1_to_k_weight", "transformer_blocks_0_attn1_to_v_weight"]
    else:
        assert len(k_rows) == 4
    ff = [
        n
        for n in gm.graph.nodes
        if n.target is aten.linear.default and "transformer_blocks.1.ff" in str(n.meta.get("nn_module_stack", {}))
    ]
    assert [n.meta["val"].shape[1] for n in ff] == [16, 16]


def test_transform_leaves_model_untouched(dit):
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    forward = type(dit).forward
    inputs = dit_inputs()
    with torch.no_grad():
        before = dit(**inputs).sample
    tm = tcpass.transform(dit, CachePlan(keep_ratio=0.25))
    run(tm, inputs)
    assert type(dit).forward is forward and "forward" not in vars(dit)
    assert not dit._forward_hooks and not dit._forward_pre_hooks
    for k, v in dit.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():  # the same eager model on the same inputs in one process: bit-identical
        assert torch.equal(dit(**inputs).sample, before)


def test_new_input_shape_is_traced_and_matches_eager():
    model = make_dit()
    tm = tcpass.transform(model, CachePlan(keep_ratio=1.0, schedule=ALL_PHASE0))
    inputs = dit_inputs(batch=4)
    for got, want in zip(run(tm, inputs), run(model, inputs), strict=True):
        assert got.shape == (4, 8, 16, 16)
        assert_close(got, want, units=REGROUPED)


def test_calls_never_record_autograd_history(dit):
    tm = tcpass.transform(dit, CachePlan(keep_ratio=0.25, schedule=ALL_PHASE0))
    outs = [tm(**{**dit_inputs(), "timestep": torch.tensor([t, t])}).sample for t in TIMESTEPS]  # grad enabled
    assert tm.step_counts[StepKind.CACHED] == 2
    assert not any(o.requires_grad for o in outs)
    assert all(c.grad_fn is None and not c.requires_grad for c in tm.step_graphs().caches)


@pytest.mark.parametrize("attention", MODES)
def test_cache_updates_are_in_place_only_in_the_executed_graph(dit, attention):
    graphs = tcpass.transform(dit, CachePlan(keep_ratio=0.25, attention=attention)).step_graphs()
    cached = graphs.cached[0]
    n_caches = len(cached.cache_specs)
    inplace = [n for n in cached.exec_gm.graph.nodes if n.target is torch.ops.aten.scatter_.src]
    functional = [n for n in cached.gm.graph.nodes if n.target is torch.ops.aten.scatter_.src]
    assert len(inplace) == n_caches and not functional
    # the input_change cache is read (scored) before it is updated, and the update still happens in place
    assert any(n.args[0].target.endswith("_input") for n in inplace)


def test_cache_buffers_keep_their_addresses_across_generations(dit):
    tm = tcpass.transform(dit, CachePlan(keep_ratio=0.25, attention="cached_kv", schedule=ALL_PHASE0))
    buffers = tm.step_graphs().caches
    addresses = [b.data_ptr() for b in buffers]
    snapshots = []
    for seed in (1, 2):  # the timestep goes back up: the second call sequence is a new generation
        run(tm, dit_inputs(seed=seed))
        snapshots.append([b.clone() for b in buffers])
    assert tm.step_counts == {StepKind.FULL: 2, StepKind.CACHED: 4}
    assert tm.step_graphs().caches is buffers
    assert [b.data_ptr() for b in tm.step_graphs().caches] == addresses
    assert all(not torch.equal(a, b) for a, b in zip(*snapshots, strict=True)), "every buffer is rewritten"
    assert tm.cache_bytes == sum(b.numel() * b.element_size() for b in buffers) > 0


@pytest.mark.parametrize(
    "plan",
    [
        CachePlan(keep_ratio=0.25, attention="cached_kv", block_keep_ratio={1: 0.0}),  # K = 0: caches pass through
        CachePlan(keep_ratio=0.25, attention="kept_only", selector=SelectorSpec(kind="toca")),
        CachePlan(keep_ratio=0.25, attention="full_kv", selector=SelectorSpec(kind="random")),  # kept-index inputs
    ],
    ids=["cached_kv-block_reuse", "kept_only-toca", "full_kv-random"],
)
def test_write_back_graphs_compute_what_the_functional_graphs_return(dit, plan):
    from tcpass.passes.writeback import write_caches_back

    graphs = tcpass.transform(dit, plan).step_graphs()
    values = list(dit_inputs().values())
    buffers = [torch.full(s.shape, float("nan"), dtype=s.dtype) for s in graphs.full.cache_specs]
    # the executed graphs run the functional graph's ops in its order on the same shapes (only where the
    # caches are written differs), so they are bit-identical to it
    with torch.no_grad():
        want = graphs.full.gm(*values)
        assert torch.equal(graphs.full(*values, *buffers), want[0])
        for got, expected in zip(buffers, want[1:], strict=True):
            assert torch.equal(got, expected)
        cached = graphs.cached[0]
        indices = [s.example() for s in cached.index_specs]
        before = [b.clone() for b in buffers]
        want = cached.gm(*values, *buffers, *indices)
        assert all(torch.equal(a, b) for a, b in zip(before, buffers, strict=True)), "gm must stay functional"
        # the executed graph (updates in place) and the write-back of the functional graph (copies at the end)
        copied = write_caches_back(cached.gm, cached.cache_specs)
        for graph in (cached.exec_gm, copied):
            state = [b.clone() for b in before]
            assert torch.equal(graph(*values, *state, *indices)[0], want[0])
            for got, expected in zip(state, want[1:], strict=True):
                assert torch.equal(got, expected)
    n_copies = sum(n.target is torch.ops.aten.copy_.default for n in copied.graph.nodes)
    assert n_copies == sum(n.target is torch.ops.aten.scatter.src for n in cached.gm.graph.nodes) > 0


def test_write_back_refuses_a_cache_updated_to_a_view_of_another_cache():
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from tcpass.contracts import TensorSpec
    from tcpass.passes.writeback import write_caches_back

    class Step(torch.nn.Module):
        def forward(self, x, a, b):
            return (x + 1, b.view(4), a + 1)  # the new "a" aliases the old "b", which the copies overwrite

    gm = torch.fx.symbolic_trace(Step())
    FakeTensorProp(gm).propagate(*(torch.zeros(4) for _ in range(3)))
    specs = [TensorSpec(name, 0, "delta", (4,), torch.float32) for name in ("a", "b")]
    with pytest.raises(NotImplementedError, match="cache a is updated to a view of the cache input b"):
        write_caches_back(gm, specs)


def _layouts_and_storages(gm) -> tuple[dict, dict]:
    """Per node name: its value's tensors' layouts, and the first node (by name) whose value shares each storage."""
    layouts, owner, shares = {}, {}, {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        tensors = [v for v in (val if isinstance(val, (list, tuple)) else [val]) if isinstance(v, torch.Tensor)]
        layouts[node.name] = [(tuple(v.shape), v.stride(), v.storage_offset(), v.dtype, v.device) for v in tensors]
        shares[node.name] = [owner.setdefault(v.untyped_storage()._cdata, node.name) for v in tensors]
    return layouts, shares


@pytest.mark.parametrize(
    "family,plan",
    [
        ("dit", CachePlan(keep_ratio=0.25, attention="cached_kv", block_keep_ratio={1: 0.0})),
        ("dit", CachePlan(keep_ratio=0.25, attention="kept_only", selector=SelectorSpec(kind="toca"))),
        ("dit", CachePlan(keep_ratio=0.25, attention="full_kv", selector=SelectorSpec(kind="random"))),
        ("dit", CachePlan(keep_ratio=0.25, forecast=ForecastSpec(kind="taylor", order=2))),
        ("dit", CachePlan(keep_ratio=0.5, skip=StepSkip(timesteps=[700, 500], weights=[[1.5, -0.5], [1.2, -0.2]]))),
        ("dit", CachePlan(blocks=(), skip=StepSkip(timesteps=[700], level="output"))),
        ("sd3", CachePlan(keep_ratio=0.5, attention="cached_kv")),
        ("cogvideox", CachePlan(keep_ratio=0.5, attention="cached_kv")),  # rotates a slice of its keys in place
        ("wan", CachePlan(keep_ratio=0.5, skip=StepSkip(timesteps=[0.7]))),  # writes into an empty_like
    ],
    ids=[
        "cached_kv-block_reuse",
        "kept_only-toca",
        "full_kv-random",
        "taylor",
        "skip_stack",
        "skip_output",
        "sd3",
        "cogvideox",
        "wan",
    ],  # fmt: skip
)
def test_step_graph_values_are_what_a_full_fake_propagation_gives(family, plan, monkeypatch):
    """`finalize` propagates only the nodes a pass changed: every node's value has the layout, and shares its
    storage with the same nodes, as after a fresh ``FakeTensorProp`` of the whole graph, which only the trace got."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from tcpass.passes import layout, pipeline
    from tcpass.passes.cleanup import strip_export_artifacts
    from tcpass.trace import copy_graph_module
    from tests.families import MAKERS, family_inputs

    model = make_dit() if family == "dit" else MAKERS[family]()
    inputs = dit_inputs() if family == "dit" else family_inputs(family)

    full, traces = [], []

    def counted(gm, mode):
        full.append(gm)
        return FakeTensorProp(gm, mode)

    def cleaned(gm, names):
        traces.append(gm)
        return strip_export_artifacts(gm, names)

    monkeypatch.setattr(layout, "FakeTensorProp", counted)
    monkeypatch.setattr(pipeline, "strip_export_artifacts", cleaned)
    graphs = tcpass.transform(model, plan).step_graphs(inputs)
    monkeypatch.undo()
    assert full == traces, "only traces are propagated in full"
    steps = [graphs.full, *graphs.cached.values(), *([graphs.skip] if graphs.skip else [])]
    assert len(steps) >= 2
    for step in steps:
        fresh = copy_graph_module(step.gm)
        placeholders = [n.meta["val"] for n in fresh.graph.nodes if n.op == "placeholder"]
        examples = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) for v in placeholders]
        FakeTensorProp(fresh, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*examples)
        assert _layouts_and_storages(step.gm) == _layouts_and_storages(fresh)
