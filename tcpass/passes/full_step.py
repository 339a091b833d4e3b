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
    return (sample, delta, [k, v,] ...)      # + block3.attn0.key/.value (cached_kv), the policy's caches

The token policy (`tcpass.policies`) says what fills its own caches (``input_change``: the block
input; ``toca``: an explicit attention path scoring the attention each token received).

The model output is computed by exactly the original nodes, so it equals the eager model.
"""

from __future__ import annotations

import torch
from torch import fx

from tcpass.contracts import TensorSpec, block_cache
from tcpass.passes.emit import Emitter
from tcpass.passes.layout import append_outputs, block_caches
from tcpass.passes.token_axis import analyze
from tcpass.policies import TokenPolicy
from tcpass.trace import copy_graph_module, find_blocks

aten = torch.ops.aten


def emit_full_step(
    gm: fx.GraphModule,
    block_prefixes: tuple[str, ...],
    blocks: tuple[int, ...],
    attention: str,
    policy: TokenPolicy,
) -> tuple[fx.GraphModule, list[TensorSpec]]:
    """A copy of ``gm`` that also returns the caches of ``blocks``; returns it with the cache layout."""
    gm = copy_graph_module(gm)
    spans = find_blocks(gm.graph, block_prefixes)
    cache_specs: list[TensorSpec] = []
    cache_nodes: list[fx.Node] = []
    for b in blocks:
        span = spans[b]
        ta = analyze(span.nodes, span.hidden_in, f"block {b} ({span.path})")
        specs = block_caches(span, ta, attention, policy)
        em = Emitter(gm.graph, span.nodes[-1], span.hidden_out)
        values = {block_cache(b, "delta"): em(aten.sub.Tensor, (span.hidden_out, span.hidden_in))}
        for j, node in enumerate(ta.self_attentions()):
            values[block_cache(b, f"attn{j}.key")] = node.args[1]
            values[block_cache(b, f"attn{j}.value")] = node.args[2]
        values.update(policy.full_values(em, span, ta))
        cache_specs += specs
        cache_nodes += [values[s.name] for s in specs]
    graph_values = policy.graph_full_values(spans)
    for spec in policy.graph_caches(spans):
        cache_specs.append(spec)
        cache_nodes.append(graph_values[spec.name])
    append_outputs(gm.graph, cache_nodes)
    return gm, cache_specs
