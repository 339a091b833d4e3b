"""FULL-step pass: compute the model unchanged and also return every cached block's caches.

Before (one cached block)::

    x = ...                                  # block input [B, N, D]
    y = <block 3 on all N tokens>(x)         # block output
    ...
    return (sample,)

After::

    x = ...
    y = <block 3 on all N tokens>(x)         # unchanged
    delta = y - x                            # block3.delta
    ...
    return (sample, delta, [k, v,] ...)      # + block3.attn0.key/.value (cached_kv), the selector's caches

The token selector (`tcpass.selectors`) says what fills its own caches (``input_change``: the block
input; ``toca``: an explicit attention path scoring the attention each token received), and so does
the forecaster (`tcpass.forecasters`). A forecaster that keeps a history makes the FULL graph take
the caches it carries as inputs after the model inputs (``taylor``: the older residual and each
token's timestamp move one place older)::

    def forward(x, t, block3_delta, block3_stamp):   # the values before this step
        ...
        return (sample, delta, block3_delta.clone(), t, block3_stamp.clone())

The model output is computed by exactly the original nodes, so it equals the eager model.
"""

from __future__ import annotations

import torch
from torch import fx

from tcpass.contracts import TensorSpec, block_cache
from tcpass.forecasters import TokenForecaster
from tcpass.passes.emit import Emitter
from tcpass.passes.layout import add_placeholders, append_outputs, block_caches, timestep_node
from tcpass.passes.token_axis import analyze
from tcpass.selectors import TokenSelector
from tcpass.trace import copy_graph_module, find_blocks

aten = torch.ops.aten


def emit_full_step(
    gm: fx.GraphModule,
    block_prefixes: tuple[str, ...],
    blocks: tuple[int, ...],
    attention: str,
    selector: TokenSelector,
    forecaster: TokenForecaster | None = None,
    timestep_input: str | None = None,
) -> tuple[fx.GraphModule, list[TensorSpec], list[TensorSpec]]:
    """A copy of ``gm`` that also returns the caches of ``blocks``; returns it with the cache layout and
    the caches it takes as inputs (those the forecaster carries)."""
    gm = copy_graph_module(gm)
    spans = find_blocks(gm.graph, block_prefixes)
    analyses = {b: analyze(spans[b].nodes, spans[b].hidden_in, f"block {b} ({spans[b].path})") for b in blocks}
    per_block = {b: block_caches(spans[b], analyses[b], attention, selector, forecaster) for b in blocks}
    carried = [s for b in blocks for s in per_block[b] if forecaster is not None and s.name in forecaster.carried(b)]
    old = add_placeholders(gm.graph, carried) if carried else {}
    timestep = timestep_node(gm.graph, timestep_input)
    cache_specs: list[TensorSpec] = []
    cache_nodes: list[fx.Node] = []
    for b in blocks:
        span, ta, specs = spans[b], analyses[b], per_block[b]
        em = Emitter(gm.graph, span.nodes[-1], span.hidden_out)
        values = {block_cache(b, "delta"): em(aten.sub.Tensor, (span.hidden_out, span.hidden_in))}
        for j, node in enumerate(ta.self_attentions()):
            values[block_cache(b, f"attn{j}.key")] = node.args[1]
            values[block_cache(b, f"attn{j}.value")] = node.args[2]
        values.update(selector.full_values(em, span, ta))
        if forecaster is not None:
            values.update(forecaster.full_values(em, b, values[block_cache(b, "delta")], old, timestep))
        cache_specs += specs
        cache_nodes += [values[s.name] for s in specs]
    graph_values = selector.graph_full_values(spans)
    for spec in selector.graph_caches(spans):
        cache_specs.append(spec)
        cache_nodes.append(graph_values[spec.name])
    append_outputs(gm.graph, cache_nodes)
    return gm, cache_specs, carried
