"""``toca``: the ToCa-style baseline, chosen inside the graph.

Block ``b`` keeps the K tokens that received the most attention at the last FULL step (computed there
with an explicit attention path, for scoring only: the mean over heads and queries of
``softmax(q k^T * scale)``). Tokens recomputed since are deprioritised (their score zeroed), so
successive CACHED steps cover the next most-attended ones. Cache ``block{b}.score`` [B, N].
"""

from __future__ import annotations

from tcpass.contracts import TensorSpec, block_cache
from tcpass.selectors.base import TokenSelector, register_selector


def _self_attention(span, ta):
    found = ta.self_attentions()
    if not found:
        raise ValueError(f"selector 'toca' needs a self-attention in block {span.index} ({span.path}); none found.")
    return found[0]


def attention_received(em, sdpa):
    """[B, N]: mean over heads and queries of ``softmax(q k^T * scale)`` for an SDPA node [B, H, N, d]."""
    import torch

    aten = torch.ops.aten
    q, k = sdpa.args[:2]
    head_dim = int(q.meta["val"].shape[-1])
    scale = sdpa.kwargs.get("scale") or head_dim**-0.5
    logits = em(aten.mul.Tensor, (em(aten.matmul.default, (q, em(aten.transpose.int, (k, -2, -1)))), scale))
    probs = em(aten._softmax.default, (logits, -1, False))
    return em(aten.mean.dim, (probs, [1, 2]))


@register_selector
class TocaSelector(TokenSelector):
    kind = "toca"

    def block_caches(self, span, ta):
        _self_attention(span, ta)
        v = span.hidden_in.meta["val"]
        return [TensorSpec(block_cache(span.index, "score"), span.index, "score", tuple(v.shape[:2]), v.dtype)]

    def full_values(self, em, span, ta):
        return {block_cache(span.index, "score"): attention_received(em, _self_attention(span, ta))}

    def kept_score(self, em, span, x_in, caches, ctx):
        return caches[block_cache(span.index, "score")]

    def after_keep(self, em, span, idx, x_kept, caches, updated, ctx):
        import torch

        aten = torch.ops.aten
        name = block_cache(span.index, "score")
        zeros = em(aten.mul.Tensor, (em(aten.gather.default, (caches[name], 1, idx)), 0.0))
        updated[name] = em(aten.scatter.src, (caches[name], 1, idx, zeros))
