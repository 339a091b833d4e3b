"""``input_change``: training-free, content-aware, chosen inside the graph.

Block ``b`` keeps the K tokens whose input moved most (squared L2 over features) since the block last
computed them. Cache ``block{b}.input`` [B, N, D]: the block input when each token was last
computed (filled at FULL steps; the kept rows refreshed at CACHED steps).
"""

from __future__ import annotations

from tcpass.contracts import TensorSpec, block_cache
from tcpass.selectors.base import TokenSelector, register_selector


@register_selector
class InputChangeSelector(TokenSelector):
    kind = "input_change"

    def block_caches(self, span, ta):
        v = span.hidden_in.meta["val"]
        return [TensorSpec(block_cache(span.index, "input"), span.index, "input", tuple(v.shape), v.dtype)]

    def full_values(self, em, span, ta):
        return {block_cache(span.index, "input"): span.hidden_in}

    def kept_score(self, em, span, x_in, caches, ctx):
        import torch

        aten = torch.ops.aten
        change = em(aten.sub.Tensor, (x_in, caches[block_cache(span.index, "input")]))
        return em(aten.sum.dim_IntList, (em(aten.mul.Tensor, (change, change)), [-1]))

    def after_keep(self, em, span, idx, x_kept, caches, updated, ctx):
        name = block_cache(span.index, "input")
        shape = list(span.hidden_in.meta["val"].shape)
        updated[name] = em.scatter(caches[name], 1, idx, x_kept, shape, ctx["keep"][span.index])
