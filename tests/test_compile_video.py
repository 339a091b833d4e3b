"""Video DiTs under ``torch.compile``: no graph break and no recompile over two generations, equal to eager.

(A file of its own, sorted early, so that pytest-xdist's ``--dist loadfile`` does not leave the longest
video tests for last.)
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import tcpass
from tcpass import StepKind
from tests.families import MAKERS, family_inputs
from tests.test_video import PLAN, generation
from tests.tolerance import OTHER_KERNELS, assert_close


@pytest.mark.parametrize("family", ["wan", "hunyuan", "cogvideox", "ltx"])
def test_compiled_two_generations_without_graph_breaks_or_recompiles(family):
    model = MAKERS[family]()
    torch._dynamo.reset()
    counters.clear()
    compiled = tcpass.transform(model, PLAN, example_inputs=family_inputs(family), backend="inductor")
    first = generation(compiled, family, 0)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = generation(compiled, family, 100)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled.step_counts[StepKind.CACHED] > 0
    eager = tcpass.transform(model, PLAN, example_inputs=family_inputs(family))
    for seed, got in ((0, first), (100, second)):
        for i, (g, w) in enumerate(zip(got, generation(eager, family, seed), strict=True)):
            assert_close(g, w, units=OTHER_KERNELS, what=f"generation {seed}, step {i}")
