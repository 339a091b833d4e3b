"""Token selectors (`tcpass.selectors`): adding one is one module and one registry entry.

Two toy selectors, each written here as a new selector module would be, registered, and run through the
whole machinery with nothing else changed: transform (FULL/CACHED graphs, caches), golden outputs
against an independent reference, torch.compile, ONNX export and the numpy runtime.
"""

import copy

import numpy as np
import pytest
import torch

import tcpass
from tcpass import CachePlan, SelectorSpec, StepKind, TPRRSchedule
from tcpass.contracts import TensorSpec, block_cache
from tcpass.selectors import SELECTORS, StaticScoreSelector, TokenSelector
from tests.conftest import dit_inputs, make_dit
from tests.reference import ReferenceTokenCache
from tests.tolerance import OTHER_KERNELS, REGROUPED, assert_close

ALL_PHASE0 = TPRRSchedule(boundary_timestep=0, intervals=(3, 3))
TIMESTEPS = (900, 800, 700)


class LargestUpdateSelector(TokenSelector):
    """In the graph, with a cache of its own: keep the tokens whose last computed residual update
    (``block{b}.delta``'s companion ``block{b}.norm``, [B, N], filled at FULL steps) was largest."""

    kind = "largest_update"

    def block_caches(self, span, ta):
        v = span.hidden_in.meta["val"]
        return [TensorSpec(block_cache(span.index, "norm"), span.index, "norm", tuple(v.shape[:2]), v.dtype)]

    def full_values(self, em, span, ta):
        aten = torch.ops.aten
        delta = em(aten.sub.Tensor, (span.hidden_out, span.hidden_in))
        return {block_cache(span.index, "norm"): em(aten.sum.dim_IntList, (em(aten.mul.Tensor, (delta, delta)), [-1]))}

    def kept_score(self, em, span, x_in, caches, ctx):
        return caches[block_cache(span.index, "norm")]


class StridedSelector(TokenSelector):
    """Outside the graph: every (N/K)-th token, the offset advancing at each CACHED call."""

    kind = "strided"
    in_graph = False

    def reset(self):
        self.calls = 0

    def __init__(self, spec, plan_dir=None):
        super().__init__(spec, plan_dir)
        self.reset()

    def indices(self, block, shape, num_tokens, timestep):
        batch, k = shape
        stride = num_tokens // k
        offset = (self.calls // 2) % stride  # two cached blocks per call in these tests
        self.calls += 1
        return np.broadcast_to(np.arange(k) * stride + offset, (batch, k)).astype(np.int64)


@pytest.fixture
def registered(monkeypatch):
    for selector in (LargestUpdateSelector, StridedSelector):
        monkeypatch.setitem(SELECTORS, selector.kind, selector)  # what @register_selector does, undone after the test


def run(model, inputs):
    with torch.no_grad():
        return [model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)}).sample for t in TIMESTEPS]


def reference(dit, blocks, select, inputs):
    ref = ReferenceTokenCache(copy.deepcopy(dit), blocks, "full_kv", select)
    return [
        ref({**inputs, "timestep": torch.full_like(inputs["timestep"], t)}, full=(i == 0))
        for i, t in enumerate(TIMESTEPS)
    ]


def test_unregistered_kind_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"selector.kind = 'largest_update' is unknown; expected one of \("):
        SelectorSpec(kind="largest_update")


def test_in_graph_toy_selector_matches_an_independent_reference(registered):
    dit, inputs, blocks = make_dit(), dit_inputs(), (0, 2)
    plan = CachePlan(blocks=blocks, keep_ratio=0.25, schedule=ALL_PHASE0, selector=SelectorSpec(kind="largest_update"))
    tm = tcpass.transform(dit, plan)
    got = run(tm, inputs)
    assert [s.name for s in tm.step_graphs().full.cache_specs if s.kind == "norm"] == ["block0.norm", "block2.norm"]
    norms = {}  # independent: each block's ||out - in||^2 at the FULL step, from hooks on the eager model
    model = copy.deepcopy(dit)

    def record(b):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            norms.setdefault(b, ((out - x) ** 2).sum(-1))

        return hook

    for b in blocks:
        model.transformer_blocks[b].register_forward_hook(record(b), with_kwargs=True)
    with torch.no_grad():
        model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], TIMESTEPS[0])})
    want = reference(dit, blocks, lambda b, x, st: norms[b].topk(16, dim=1).indices, inputs)
    for i in range(3):
        assert_close(got[i], want[i], units=REGROUPED, what=f"step {i}")
    assert tm.step_counts[StepKind.CACHED] == 2


def test_out_of_graph_toy_selector_matches_reference_and_runs_on_onnx_runtime(registered, tmp_path):
    from tcpass.export.onnx_export import export_onnx
    from tcpass.export.ort_runtime import OrtTokenCacheRuntime

    dit, inputs, blocks = make_dit(), dit_inputs(), (0, 1)
    plan = CachePlan(blocks=blocks, keep_ratio=0.25, schedule=ALL_PHASE0, selector=SelectorSpec(kind="strided"))
    tm = tcpass.transform(dit, plan)
    got = run(tm, inputs)
    step = {"cached": -1}

    def select(b, x, _state):
        if b == blocks[0]:
            step["cached"] += 1
        return (torch.arange(16) * 4 + step["cached"] % 4).expand(x.shape[0], 16)

    want = reference(dit, blocks, select, inputs)
    for i in range(3):
        assert_close(got[i], want[i], units=REGROUPED, what=f"step {i}")

    export_onnx(tcpass.transform(dit, plan), tmp_path / "onnx", null_label=1000)
    runtime = OrtTokenCacheRuntime(tmp_path / "onnx")
    for i, t in enumerate(TIMESTEPS):
        step_inputs = {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}
        out = runtime(**{k: v.numpy() for k, v in step_inputs.items()})
        assert_close(out, got[i].numpy(), units=OTHER_KERNELS, what=f"step {i}")
    assert runtime.step_counts[StepKind.CACHED] == 2


def test_in_graph_toy_selector_compiles_without_graph_breaks(registered):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dit, inputs = make_dit(num_layers=2), dit_inputs()
    plan = CachePlan(keep_ratio=0.25, schedule=ALL_PHASE0, selector=SelectorSpec(kind="largest_update"))
    got = run(tcpass.transform(dit, plan, backend="inductor"), inputs)
    want = run(tcpass.transform(dit, plan), inputs)
    assert dict(counters["graph_break"]) == {}
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, units=OTHER_KERNELS)


def test_static_top_k_is_one_stable_definition_ties_keep_the_lower_token():
    scores = np.zeros((1, 1, 8), np.float32)
    scores[0, 0, [5, 6]] = 1.0  # two leaders, then six ties
    table = StaticScoreSelector(scores, np.array([500.0]), np.array([0]))
    got = table.indices(0, (2, 4), 8, 480.0)
    assert got.tolist() == [[5, 6, 0, 1], [5, 6, 0, 1]] and got.dtype == np.int64


def test_the_old_policy_names_still_import_with_a_deprecation_warning():
    import importlib
    import sys

    import tcpass.selectors as selectors

    sys.modules.pop("tcpass.policies", None)
    with pytest.warns(DeprecationWarning, match="tcpass.policies is deprecated: import tcpass.selectors"):
        old = importlib.import_module("tcpass.policies")
    assert old.TokenPolicy is selectors.TokenSelector and old.POLICIES is selectors.SELECTORS
    assert old.register_policy is selectors.register_selector
