"""torch.compile executor: fullgraph, no recompiles across generations, same numbers as eager."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import tcpass
from tcpass import CachePlan, StepKind
from tcpass.sampling import ddim_sample
from tests.conftest import make_dit


def generate(model, seed):
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return ddim_sample(model, noise, torch.tensor([1, 2]), null_label=1000, num_steps=50, guidance_scale=4.0)


@pytest.fixture(scope="module")
def compiled_run():
    torch._dynamo.reset()
    counters.clear()
    model = make_dit()
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv")  # default schedule: both TPRR phases
    compiled = tcpass.transform(model, plan, backend="inductor")
    first = generate(compiled, seed=0)
    graphs_after_first = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = generate(compiled, seed=1)
    return {
        "model": model,
        "plan": plan,
        "compiled": compiled,
        "outputs": (first, second),
        "graphs_after_first": graphs_after_first,
        "graphs_after_second": counters["stats"]["unique_graphs"],
        "graph_breaks": dict(counters["graph_break"]),
    }


def test_two_generations_compile_once_without_graph_breaks(compiled_run):
    assert compiled_run["graph_breaks"] == {}
    assert compiled_run["graphs_after_first"] == 2  # FULL + CACHED (both phases share K)
    assert compiled_run["graphs_after_second"] == compiled_run["graphs_after_first"]
    counts = compiled_run["compiled"].step_counts
    assert counts[StepKind.FULL] > 0 and counts[StepKind.CACHED] > counts[StepKind.FULL]


def test_compiled_matches_eager_transformed(compiled_run):
    eager = tcpass.transform(compiled_run["model"], compiled_run["plan"])
    for seed, got in enumerate(compiled_run["outputs"]):
        want = generate(eager, seed)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-4, f"generation {seed}: max relative error {rel:.2e}"
