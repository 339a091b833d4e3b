"""Reinplacing pass: CACHED-step cache updates write only the K kept rows, in place.

The caching passes emit functional updates, ``new = scatter(cache, axis, idx, rows)``, which copy
the whole cache every step (for DiT-XL/2 at batch 2 with K/V caches, about 260 MiB of memory
traffic per step). When nothing reads the old cache after the update, the copy is unnecessary:

Before::

    score = sum((x - block3_input) ** 2, -1)          # reads the cache first
    ...
    block3_input_next = scatter(block3_input, 1, idx, x_kept)
    return (sample, ..., block3_input_next)

After::

    score = sum((x - block3_input) ** 2, -1)
    ...
    block3_input_next = scatter_(block3_input, 1, idx, x_kept)   # mutates the cache input
    return (sample, ..., block3_input_next)                      # same tensor as the input

The eager and compiled executors run the reinplaced graph, in write-back form
(`tcpass.passes.writeback`: the runtime owns the caches as static buffers; the caller's tensors are
never caches). ONNX has no in-place ops, so export uses the functional graph; the tests compare
the two.
"""

from __future__ import annotations

import torch
from torch import fx

from tcpass.trace import copy_graph_module

aten = torch.ops.aten


def reinplace_cache_updates(gm: fx.GraphModule, cache_inputs: list[str]) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` whose scatters into the placeholders ``cache_inputs`` are in place.

    A scatter is rewritten only when every other user of its cache placeholder comes before it in
    graph order (so eager execution reads the old value first). Returns the graph and the count.
    """
    gm = copy_graph_module(gm)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or node.target not in cache_inputs:
            continue
        updates = [u for u in node.users if u.target is aten.scatter.src and u.args[0] is node]
        if len(updates) != 1:
            continue
        update = updates[0]
        if any(order[u] > order[update] for u in node.users if u is not update):
            continue
        update.target = aten.scatter_.src
        rewritten += 1
    gm.graph.lint()
    gm.recompile()
    return gm, rewritten
