"""torch.compile executor: every step-specialized graph compiled once, fullgraph, static shapes.

The TPRR runtime only chooses which compiled graph to call, so there is no Python decision, no
``.item()`` and no data-dependent shape inside a compiled region: zero graph breaks, and no
recompilation after the first generation (each graph sees one input signature for good). Graphs
write their caches into static buffers marked with ``mark_static_address``, so
``mode="reduce-overhead"`` (CUDA graphs) can keep their in-place updates.
"""

from __future__ import annotations

import torch

from tcpass.graphs import StepGraphs


def compile_step_graphs(graphs: StepGraphs, backend: str = "inductor", mode: str | None = None) -> None:
    """In place: give every graph of ``graphs`` a compiled ``run`` (phases sharing a graph share it)."""
    seen: dict[int, object] = {}
    for step_graph in [graphs.full, *graphs.cached.values(), *([graphs.skip] if graphs.skip else [])]:
        key = id(step_graph)
        if key not in seen:
            seen[key] = torch.compile(step_graph.exec_gm, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        step_graph.run = seen[key]
