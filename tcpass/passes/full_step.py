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
    return (sample, delta, [k, v,] [x])      # + block3.attn0.key/.value (cached_kv), block3.input (input_change)

With ``selector="toca"`` the FULL graph also scores tokens ToCa-style: an explicit attention path
next to the fused one, ``softmax(q k^T * scale)`` averaged over heads and queries, the attention
each token received ([B, N], cache ``block3.score``). It is only used for scoring.

The model output is computed by exactly the original nodes, so it equals the eager model.
"""

from __future__ import annotations

import torch
from torch import fx

from tcpass.passes.emit import Emitter
from tcpass.passes.layout import (
    TensorSpec,
    append_outputs,
    block_caches,
    copy_graph_module,
    predictor_caches,
    self_attentions,
)
from tcpass.passes.token_axis import analyze
from tcpass.trace import find_blocks

aten = torch.ops.aten


def emit_full_step(
    gm: fx.GraphModule,
    block_prefixes: tuple[str, ...],
    blocks: tuple[int, ...],
    attention: str,
    selector: str,
) -> tuple[fx.GraphModule, list[TensorSpec]]:
    """A copy of ``gm`` that also returns the caches of ``blocks``; returns it with the cache layout."""
    gm = copy_graph_module(gm)
    spans = find_blocks(gm.graph, block_prefixes)
    cache_specs: list[TensorSpec] = []
    cache_nodes: list[fx.Node] = []
    for b in blocks:
        span = spans[b]
        ta = analyze(span.nodes, span.hidden_in, f"block {b} ({span.path})")
        specs = block_caches(span, ta, attention, selector)
        em = Emitter(gm.graph, span.nodes[-1], span.hidden_out)
        values = {f"block{b}.delta": em(aten.sub.Tensor, (span.hidden_out, span.hidden_in))}
        for j, node in enumerate(self_attentions(ta)):
            values[f"block{b}.attn{j}.key"] = node.args[1]
            values[f"block{b}.attn{j}.value"] = node.args[2]
        values[f"block{b}.input"] = span.hidden_in
        if selector == "toca":
            values[f"block{b}.score"] = attention_received(em, self_attentions(ta)[0])
        cache_specs += specs
        cache_nodes += [values[s.name] for s in specs]
    for spec in predictor_caches(spans, selector):
        cache_specs.append(spec)
        cache_nodes.append(spans[0].hidden_in)
    append_outputs(gm.graph, cache_nodes)
    return gm, cache_specs


def attention_received(em: Emitter, sdpa: fx.Node) -> fx.Node:
    """[B, N]: mean over heads and queries of ``softmax(q k^T * scale)`` for an SDPA node [B, H, N, d]."""
    q, k = sdpa.args[:2]
    head_dim = int(q.meta["val"].shape[-1])
    scale = sdpa.kwargs.get("scale") or head_dim**-0.5
    logits = em(aten.mul.Tensor, (em(aten.matmul.default, (q, em(aten.transpose.int, (k, -2, -1)))), scale))
    probs = em(aten._softmax.default, (logits, -1, False))
    return em(aten.mean.dim, (probs, [1, 2]))
