"""CACHED-step pass: each cached block recomputes K of its N tokens and reuses cached residuals.

Before (one block, DiT)::

    x = ...                                          # [B, N, D]
    h = modulate(layer_norm(x)); q, k, v = h @ Wq, h @ Wk, h @ Wv
    a = sdpa(q, k, v); x1 = x + g1 * (a @ Wo); y = x1 + g2 * mlp(modulate(layer_norm(x1)))
    return (sample,)

After (``attention="full_kv"``; ``idx`` [B, K] per batch row)::

    x = ...
    h = modulate(layer_norm(x)); k, v = h @ Wk, h @ Wv          # keys/values of all N tokens
    h_K = gather(h, 1, idx); q_K = h_K @ Wq                     # queries of the K kept tokens
    a_K = sdpa(q_K, k, v); x_K = gather(x, 1, idx)
    y_K = x_K + g1 * (a_K @ Wo) ...                             # the rest of the block on K tokens
    delta' = scatter(delta, 1, idx, y_K - x_K)                  # refresh kept rows of the cache
    y = x + delta'                                              # pruned tokens: x + cached delta
    return (sample, delta')

``cached_kv`` computes k/v for the K kept tokens only and scatters them into the K/V caches the
attention then reads; ``kept_only`` runs the whole block, attention included, on the K tokens.
Kept indices are always a fixed-K top-k, so shapes stay static. The token selector
(`tcpass.selectors`) gives each block's [B, N] score in the graph (``kept_score``) and updates its
own caches (``after_keep``); a selector that chooses outside the graph (``random``, ``static``) makes
the indices graph inputs ``block{b}.kept_indices`` [B, K] instead.

K = 0 (``keep_ratio`` 0) is whole-block reuse (FORA-style): the block is not run at all and its
output is ``x + delta_cache``; its caches pass through unchanged.

What the pruned tokens get is the forecaster's (`tcpass.forecasters`): ``reuse`` (default) is the
cached ``delta`` above; a forecasting one gives every token's forecast residual ``f`` from its own
history, read before any cache is updated, and the kept rows replace theirs::

    f = forecast(delta, <history caches>, t)                  # [B, N, D]
    y = x + scatter(f, 1, idx, y_K - x_K)                     # K = 0: y = x + f
"""

from __future__ import annotations

import itertools
import operator

import torch
from torch import fx
from torch.fx.node import map_arg

from tcpass.contracts import TensorSpec, block_cache
from tcpass.forecasters import Reuse, TokenForecaster
from tcpass.passes.emit import Emitter
from tcpass.passes.layout import (
    add_placeholders,
    append_outputs,
    attention_kv_sources,
    block_caches,
    is_self_attention,
    timestep_node,
)
from tcpass.passes.token_axis import RESHAPES, TokenAxes, UnsupportedBlockError, analyze
from tcpass.selectors import TokenSelector
from tcpass.trace import BlockSpan, copy_graph_module, find_blocks

aten = torch.ops.aten


def emit_cached_step(
    gm: fx.GraphModule,
    block_prefixes: tuple[str, ...],
    keep: dict[int, int],
    attention: str,
    selector: TokenSelector,
    module: torch.nn.Module | None = None,
    timestep_input: str | None = None,
    forecaster: TokenForecaster | None = None,
) -> tuple[fx.GraphModule, list[TensorSpec], list[TensorSpec]]:
    """A copy of ``gm`` where block ``b`` recomputes ``keep[b]`` tokens, for every ``b`` in ``keep``.

    ``selector`` chooses the tokens; ``module`` is the module its graph calls, if any (the dynamic
    predictor, given the name of the timestep input); ``forecaster`` gives the other tokens' residuals
    (None: ``reuse``). Returns the graph, its cache layout (inputs and, updated, outputs) and its
    kept-index inputs.
    """
    forecaster = forecaster or Reuse(None)
    gm = copy_graph_module(gm)
    graph = gm.graph
    spans = find_blocks(graph, block_prefixes)
    analyses = {b: analyze(spans[b].nodes, spans[b].hidden_in, f"block {b} ({spans[b].path})") for b in keep}
    cache_specs = [s for b in keep for s in block_caches(spans[b], analyses[b], attention, selector, forecaster)]
    cache_specs += selector.graph_caches(spans)
    index_specs = []
    if not selector.in_graph:
        batch = int(spans[0].hidden_in.meta["val"].shape[0])
        index_specs = [
            TensorSpec(block_cache(b, "kept_indices"), b, "kept_indices", (batch, k), torch.long)
            for b, k in keep.items()
            if k > 0
        ]
    placeholders = add_placeholders(graph, cache_specs + index_specs)
    updated: dict[str, fx.Node] = {}
    ctx = {
        "keep": keep,
        "module": module,
        "timestep_input": timestep_input,
        "forecaster": forecaster,
        "timestep": timestep_node(graph, timestep_input),
    }
    selector.begin_cached(gm, spans, placeholders, updated, ctx)
    renamed: dict[fx.Node, fx.Node] = {}
    for b, k in keep.items():
        if k == 0:
            _reuse_block(graph, spans[b], placeholders, updated, renamed, ctx)
        else:
            _rewrite_block(graph, spans[b], analyses[b], k, attention, selector, placeholders, updated, renamed, ctx)
    # a cache nothing updated at this step keeps its value (e.g. a selector's FULL-step-only cache)
    append_outputs(graph, [updated.get(s.name, placeholders[s.name]) for s in cache_specs])
    return gm, cache_specs, index_specs


class _KeptTokens:
    """One block's values on its K kept tokens, emitted on demand (`_rewrite_block`'s working state).

    ``idx`` [B, K] are the kept image tokens; a token axis with ``pad`` text positions around the
    image tokens keeps every text position too (`index`). ``kept`` maps an original node to its value
    on the kept tokens: gathered for values that carry the token axis, recomputed for derived ones.
    """

    def __init__(self, em: Emitter, span: BlockSpan, ta: TokenAxes, x_in: fx.Node, idx: fx.Node, k: int) -> None:
        self.em, self.span, self.ta, self.x_in, self.idx, self.k = em, span, ta, x_in, idx, k
        self.batch = list(span.hidden_in.meta["val"].shape)[0]
        self.indices: dict[tuple[int, int], fx.Node] = {(0, 0): idx}
        self.kept: dict[fx.Node, fx.Node] = {}

    def index(self, pad: tuple[int, int]) -> fx.Node:
        """Kept positions of a token axis with ``pad`` text positions around the image tokens:
        every text position, and the K kept image tokens ([B, before + K + after])."""
        if pad not in self.indices:
            em, n_tokens, before, after = self.em, self.ta.num_tokens, *pad
            device = self.idx.meta["val"].device if "val" in self.idx.meta else None
            parts = []
            for lo, hi in ((0, before), (before + n_tokens, before + n_tokens + after)):
                if hi > lo:
                    r = em(aten.arange.start, (lo, hi), {"dtype": torch.long, "device": device})
                    parts.append(em(aten.expand.default, (em(aten.unsqueeze.default, (r, 0)), [self.batch, hi - lo])))
            image = em(aten.add.Tensor, (self.idx, before)) if before else self.idx
            parts.insert(1 if before else 0, image)
            self.indices[pad] = em(aten.cat.default, (parts, 1))
        return self.indices[pad]

    def length(self, pad: tuple[int, int]) -> int:
        return pad[0] + self.k + pad[1]

    def on_kept(self, arg: fx.Node) -> fx.Node:
        """``arg`` (a value with a token axis) at the kept positions."""
        if arg not in self.kept:
            src = self.x_in if arg is self.span.hidden_in else arg
            pad = self.ta.pad_of(arg)
            shape = list(arg.meta["val"].shape)
            self.kept[arg] = self.em.gather(src, self.ta.axis[arg], self.index(pad), shape, self.length(pad))
        return self.kept[arg]

    def gather_constant(self, arg: fx.Node, source: fx.Node, axis: int, user: fx.Node) -> fx.Node:
        """A tensor that spans ``user``'s token axis without depending on the block input, at the kept positions."""
        em = self.em
        shape = list(arg.meta["val"].shape)
        out_rank = user.meta["val"].dim()
        if len(shape) < out_rank:  # bring it to the user's rank: leading broadcast dims
            axis += out_rank - len(shape)
            shape = [1] * (out_rank - len(shape)) + shape
            source = em(aten.view.default, (source, shape))
        if shape[0] != self.batch:  # one row for the whole batch: each batch row keeps its own tokens
            shape[0] = self.batch
            source = em(aten.expand.default, (source, shape))
        pad = self.ta.pad_of(user)
        return em.gather(source, axis, self.index(pad), shape, self.length(pad))

    def attention(self, node: fx.Node, mode: str, caches: list[str], placeholders: dict, updated: dict) -> None:
        """A self-attention on the kept queries; keys/values per ``mode`` (``caches``: the K/V cache names)."""
        q, key, value = node.args[:3]
        if mode == "full_kv":
            key_value = [key, value]
        elif mode == "cached_kv":  # refresh the kept rows of the K/V caches, attend over all of them
            key_value = []
            for name, arg in zip(caches, (key, value), strict=True):
                pad = self.ta.pad_of(arg)
                shape = list(arg.meta["val"].shape)
                kept = self.on_kept(arg)
                updated[name] = self.em.scatter(
                    placeholders[name], self.ta.axis[arg], self.index(pad), kept, shape, self.length(pad)
                )
                key_value.append(updated[name])
        else:
            if node in self.ta.key_masks:
                raise UnsupportedBlockError(
                    f"block {self.span.index} ({self.span.path}): attention='kept_only' drops keys, but "
                    f"{node.name} takes a mask over every key (a text padding mask); use attention='full_kv' or "
                    "'cached_kv', which keep every key."
                )
            key_value = [self.on_kept(key), self.on_kept(value)]
        args = (self.on_kept(q), *key_value, *node.args[3:])
        self.kept[node] = self.em(node.target, args, node.kwargs, meta_from=node)

    def recompute(self, node: fx.Node, original: dict[fx.Node, fx.Node]) -> None:
        """Any other node that depends on the block input, on the kept tokens (sizes moved from N to K)."""
        source = node.args[0] if node.target is operator.getitem else None
        if source not in self.kept and isinstance(self.ta.axis.get(source), tuple):
            # a piece of a multi-output node that stays on all tokens (a fused QKV projection whose K and V
            # attend over every token): that piece at the kept positions
            self.kept[node] = self.on_kept(node)
            return

        def remap(arg):
            if not isinstance(arg, fx.Node):
                return arg
            if arg is self.x_in:
                arg = self.span.hidden_in
            if arg in self.ta.axis:
                return self.on_kept(arg)
            source = self.kept.get(arg, arg)  # derived values are recomputed from the kept ones
            axis = self.ta.gathered_constants.get((node, original.get(arg, arg)))
            return source if axis is None else self.gather_constant(arg, source, axis, node)

        args = _resize_token_args(node, map_arg(node.args, remap), self.ta, self.k)
        self.kept[node] = self.em(node.target, args, map_arg(node.kwargs, remap), meta_from=node)

    def write_residual(
        self,
        selector: TokenSelector,
        placeholders: dict[str, fx.Node],
        updated: dict[str, fx.Node],
        renamed: dict[fx.Node, fx.Node],
        ctx: dict,
    ) -> None:
        """Scatter the kept rows' new residual into the block's cache, output ``x + residual`` in place of
        the block's output (pruned tokens: the forecaster's residual), and hand a joint block's other
        outputs their kept-token values."""
        em, span, kept = self.em, self.span, self.kept
        b = span.index
        full_shape = list(span.hidden_in.meta["val"].shape)
        x_kept = self.on_kept(span.hidden_in)
        delta_kept = em(aten.sub.Tensor, (kept[span.hidden_out], x_kept))
        forecaster, timestep = ctx["forecaster"], ctx["timestep"]
        cached = placeholders[block_cache(b, "delta")]
        forecast = forecaster.predict(em, b, placeholders, timestep)  # reads the caches before any update
        forecaster.after_keep(em, b, self.idx, self.k, delta_kept, placeholders, updated, timestep)
        forecast = forecaster.refine(em, b, forecast, cached, self.idx, self.k, delta_kept, full_shape)
        delta = em.scatter(cached, 1, self.idx, delta_kept, full_shape, self.k)
        if forecast is not cached:
            delta_out = em.scatter(forecast, 1, self.idx, delta_kept, full_shape, self.k)
        else:
            delta_out = delta
        out = em(aten.add.Tensor, (self.x_in, delta_out))
        updated[block_cache(b, "delta")] = delta
        selector.after_keep(em, span, self.idx, x_kept, placeholders, updated, ctx)
        inside = set(span.nodes)
        span.hidden_out.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside)
        renamed[span.hidden_out] = out
        for side in span.side_outputs:  # a joint block's text stream: recomputed in full from the kept tokens
            if side in self.ta.axis:
                raise ValueError(
                    f"block {b} ({span.path}): output {side.name} holds image tokens besides the residual."
                )
            if side in kept:
                side.replace_all_uses_with(kept[side], delete_user_cb=lambda user: user not in inside)
                renamed[side] = kept[side]


def _rewrite_block(
    graph: fx.Graph,
    span: BlockSpan,
    ta: TokenAxes,
    k: int,
    attention: str,
    selector: TokenSelector,
    placeholders: dict[str, fx.Node],
    updated: dict[str, fx.Node],
    renamed: dict[fx.Node, fx.Node],
    ctx: dict,
) -> None:
    """Block ``span`` on its K kept tokens; the other tokens take the cached residual (module docstring)."""
    b = span.index
    x_in = renamed.get(span.hidden_in, span.hidden_in)  # the previous block may have been rewritten
    em = Emitter(graph, span.nodes[-1], span.hidden_out)
    score = selector.kept_score(em, span, x_in, placeholders, ctx)
    if score is None:
        idx = placeholders[block_cache(b, "kept_indices")]
    else:
        idx = em(operator.getitem, (em(aten.topk.default, (score, k, 1)), 1))
    tokens = _KeptTokens(em, span, ta, x_in, idx, k)
    original = {new: old for old, new in renamed.items()}
    stays_full = attention_kv_sources(ta, span.nodes) if attention == "full_kv" else set()
    attn_index = 0
    for node in span.nodes:
        if node in stays_full or not ta.depends(node):
            continue
        if is_self_attention(node, ta):
            caches = [f"block{b}.attn{attn_index}.{kind}" for kind in ("key", "value")]
            tokens.attention(node, attention, caches, placeholders, updated)
            attn_index += 1
        else:
            tokens.recompute(node, original)
    tokens.write_residual(selector, placeholders, updated, renamed, ctx)


def _resize_token_args(node: fx.Node, args: tuple, ta: TokenAxes, k: int) -> tuple:
    """``node``'s arguments with token-axis sizes and positions moved from N image tokens to K."""
    n = ta.num_tokens
    t = node.target
    if t in RESHAPES or t is aten.expand.default:
        shape = list(args[1])
        axis = ta.axis[node]
        if shape[axis] == ta.length(node):
            shape[axis] -= n - k
        return (args[0], shape, *args[2:])
    src = node.args[0] if node.args else None
    cuts = (aten.slice.Tensor, aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default)
    if t not in cuts or not isinstance(src, fx.Node) or src not in ta.axis:
        return args
    a = ta.axis[src]
    rank = src.meta["val"].dim()
    before = ta.pad_of(src)[0]

    def moved(pos: int) -> int:
        return pos if pos <= before else pos - n + k

    if t is aten.slice.Tensor and len(args) > 1 and (args[1] + rank) % rank == a:
        length = ta.length(src)
        start, end, _ = slice(*(tuple(args[2:4]) + (None, None))[:2]).indices(length)
        return (args[0], args[1], moved(start), moved(end), *args[4:])
    if t in (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default):
        dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
        if (dim + rank) % rank != a:
            return args
        if t is not aten.split_with_sizes.default:
            raise ValueError(f"{node.name}: {t} along the token axis cannot be token-cached; only split_with_sizes.")
        sizes = list(args[1])
        bounds = itertools.accumulate(sizes, initial=0)
        new_sizes = [s - (n - k if lo == before and s == n else 0) for lo, s in zip(bounds, sizes, strict=False)]
        return (args[0], new_sizes, *args[2:])
    return args


def _reuse_block(
    graph: fx.Graph,
    span: BlockSpan,
    placeholders: dict[str, fx.Node],
    updated: dict[str, fx.Node],
    renamed: dict[fx.Node, fx.Node],
    ctx: dict,
) -> None:
    """K = 0: the block's output is its input plus the forecaster's residual (``reuse``: the cached
    one); the block is not run."""
    b = span.index
    x_in = renamed.get(span.hidden_in, span.hidden_in)
    em = Emitter(graph, span.nodes[-1], span.hidden_out)
    out = em(aten.add.Tensor, (x_in, ctx["forecaster"].predict(em, b, placeholders, ctx["timestep"])))
    for name, node in placeholders.items():
        if name.startswith(f"block{b}.") and not name.endswith("kept_indices"):
            updated[name] = node  # unchanged
    inside = set(span.nodes)
    span.hidden_out.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside)
    renamed[span.hidden_out] = out
