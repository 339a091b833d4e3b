"""torch.compile executor: fullgraph, no recompiles across generations, same numbers as eager."""

import inspect

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._inductor import cudagraph_utils, output_code

import tcpass
from tcpass import CachePlan, StepKind
from tcpass.sampling import ddim_sample
from tests.conftest import make_dit
from tests.tolerance import OTHER_KERNELS, assert_close


def generate(model, seed, num_steps=50):
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return ddim_sample(model, noise, torch.tensor([1, 2]), null_label=1000, num_steps=num_steps, guidance_scale=4.0)


@pytest.fixture(scope="module")
def compiled_run():
    torch._dynamo.reset()
    counters.clear()
    model = make_dit()
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv")  # default schedule: both TPRR phases
    compiled = tcpass.transform(model, plan, backend="inductor")
    first = generate(compiled, seed=0)
    graphs_after_first = counters["stats"]["unique_graphs"]
    addresses = [[b.data_ptr() for b in compiled.step_graphs().caches]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = generate(compiled, seed=1)
    addresses.append([b.data_ptr() for b in compiled.step_graphs().caches])
    return {
        "model": model,
        "plan": plan,
        "compiled": compiled,
        "outputs": (first, second),
        "graphs_after_first": graphs_after_first,
        "graphs_after_second": counters["stats"]["unique_graphs"],
        "graph_breaks": dict(counters["graph_break"]),
        "cache_addresses": addresses,  # after the first and after the second generation
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
        assert_close(got, want, units=OTHER_KERNELS, what=f"generation {seed}")


def test_cache_buffers_keep_their_addresses_when_compiled(compiled_run):
    after_first, after_second = compiled_run["cache_addresses"]
    assert after_first and after_first == after_second


def test_reduce_overhead_runs_and_would_keep_cuda_graphs(monkeypatch):
    """mode="reduce-overhead" on CPU: inductor skips CUDA graphs for the device alone.

    On CUDA, inductor (cudagraph trees) refuses graphs that mutate inputs other than parameters and
    static-address inputs. CPU graphs are refused earlier, for their device, so the mutation check
    never runs here: record each compiled graph and run the very checks inductor runs on CUDA.
    """
    compiled_graphs = []
    init = output_code.CompiledFxGraph.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bound = inspect.signature(init).bind(self, *args, **kwargs).arguments
        compiled_graphs.append((self, bound["gm"], bound["static_input_idxs"]))

    monkeypatch.setattr(output_code.CompiledFxGraph, "__init__", recording_init)
    torch._dynamo.reset()
    model = make_dit(num_layers=2)
    plan = CachePlan(keep_ratio=0.25, attention="cached_kv")
    caches = torch._inductor.config.patch(fx_graph_cache=False)  # a cache hit would skip __init__
    with caches, torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = tcpass.transform(model, plan, backend="inductor", compile_mode="reduce-overhead")
        got = generate(compiled, seed=0, num_steps=10)
    want = generate(tcpass.transform(model, plan), seed=0, num_steps=10)
    assert compiled.step_counts[StepKind.FULL] > 0 and compiled.step_counts[StepKind.CACHED] > 0
    assert_close(got, want, units=OTHER_KERNELS)

    assert len(compiled_graphs) == 2  # FULL and CACHED
    for graph, gm, static_input_idxs in compiled_graphs:
        reason = graph.disabled_cudagraphs_reason
        # "cpu device (...)", or with graph partitioning (default) "multiple devices: " (no CUDA device)
        assert reason.removeprefix("skipping cudagraphs due to ").startswith(("cpu device", "multiple devices"))
        assert graph.mutated_input_idxs, "the cache buffers are mutated inputs"
        mutation = cudagraph_utils.check_for_mutation_ignore_cuda_graph_managed_tensor(
            gm, graph.mutated_inputs, graph.mutated_input_idxs, static_input_idxs
        )
        assert mutation is None, mutation
        storage = cudagraph_utils.get_input_storage_mutation_info(gm)
        assert cudagraph_utils.get_input_storage_mutation_reason(storage) is None
