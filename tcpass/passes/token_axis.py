"""Analysis: where the token axis is in every tensor of a block that depends on its input tokens.

Token caching recomputes a block on K of its N tokens. That is only sound when every op of the
block treats tokens independently (linear, norms, pointwise, reshapes that keep the token axis)
except attention, which mixes tokens along its key axis. This analysis walks a block from its
residual-stream input (token axis 1) and records, for each token-dependent node, which axis holds
the tokens. An op it cannot prove token-wise raises `UnsupportedBlockError` naming the op.

Example, a DiT block::

    x [B,N,D] axis 1 -> layer_norm [B,N,D] 1 -> linear (q) [B,N,D] 1 -> view [B,N,H,d] 1
      -> transpose(1,2) [B,H,N,d] 2 -> scaled_dot_product_attention [B,H,N,d] 2 -> ...

Nodes that do not depend on the block input (the adaLN modulation computed from the timestep)
get no axis: the rewrite reuses them as they are.

Joint-attention families (SD3, Flux) concatenate the image tokens with text tokens along the token
axis. Such a *mixed* tensor keeps its token axis and records its padding ``(before, after)``: how
many non-image positions precede and follow the N image tokens on that axis. Text positions are
never pruned: the rewrite keeps all of them and K of the N image positions. Slicing the text part
back out of a mixed tensor gives a *derived* node: it depends on the image tokens (through
attention) but has no image-token axis; the rewrite recomputes it in full from the kept values::

    q = cat([q_img, q_txt], 2)     # axis 2, pad (0, T)       -> [B, H, K+T, d] after the rewrite
    a = sdpa(q, k, v)              # axis 2, pad (0, T)
    a_txt = a[:, :, N:]            # derived                 -> a[:, :, K:] after the rewrite
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

aten = torch.ops.aten

# Ops that act on each element independently but are not tagged pointwise in ATen.
_ELEMENTWISE = {
    aten.dropout.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.empty_like.default,  # same shape, no values read (written in full by what follows)
    aten.copy_.default,  # dst[...] = src element by element (Wan's rotary embedding writes slices of an empty_like)
}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_FLAT_RESHAPES = {aten.flatten.using_ints, aten.unflatten.int}  # reshapes without a shape argument to rewrite
_PRESERVING = {aten.linear.default, aten.layer_norm.default, aten.rms_norm.default}
_MOVES = {aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.expand.default}  # axis moves
_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}  # over other axes: per token
SDPA = aten.scaled_dot_product_attention.default


class UnsupportedBlockError(ValueError):
    """A block contains an op that token caching cannot rewrite."""


@dataclass
class TokenAxes:
    """Result of `analyze`: token axis per token-dependent node, plus constants to gather.

    Attributes:
        axis: node -> token axis (int), or a tuple for multi-output nodes (chunk, split), whose
            entries are ``None`` for outputs that are derived.
        num_tokens: N, the image-token count of the block input.
        pad: node -> ``(before, after)`` non-image positions around the N image tokens on the token
            axis (absent: ``(0, 0)``); a tuple of them for multi-output nodes.
        derived: nodes that depend on the block input but hold no image-token axis (the text part
            of a joint attention, and everything computed from it).
        gathered_constants: ``(user, arg)`` pairs where a tensor that does not depend on the block
            input still spans the user's token axis (a positional table, a mask); the rewrite
            gathers it too.
        attention: the attention nodes of the block.
        key_masks: attention nodes whose mask spans the keys (a text padding mask over image and text keys).
    """

    axis: dict[fx.Node, int | tuple[int | None, ...]]
    num_tokens: int
    pad: dict[fx.Node, tuple[int, int] | tuple] = field(default_factory=dict)
    derived: set[fx.Node] = field(default_factory=set)
    gathered_constants: dict[tuple[fx.Node, fx.Node], int] = field(default_factory=dict)
    attention: list[fx.Node] = field(default_factory=list)
    key_masks: set[fx.Node] = field(default_factory=set)

    def pad_of(self, node: fx.Node) -> tuple[int, int]:
        """``(before, after)`` of a single-output token node."""
        return self.pad.get(node, (0, 0))

    def length(self, node: fx.Node) -> int:
        """Size of ``node``'s token axis: text positions plus the N image tokens."""
        before, after = self.pad_of(node)
        return before + self.num_tokens + after

    def depends(self, node: fx.Node) -> bool:
        return node in self.axis or node in self.derived

    def self_attentions(self) -> list[fx.Node]:
        """Attention nodes whose keys and values come from the block's own tokens."""
        return [n for n in self.attention if n.args[1] in self.axis and n.args[2] in self.axis]


def _val(node: fx.Node) -> torch.Tensor:
    return node.meta["val"]


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _reshape_axis(in_shape: tuple[int, ...], axis: int, out_shape: tuple[int, ...]) -> int | None:
    """Axis of ``out_shape`` that holds ``in_shape[axis]`` unchanged, if the reshape keeps it whole."""
    before = math.prod(in_shape[:axis])
    prefix = 1
    for j, size in enumerate(out_shape):
        if prefix == before and size == in_shape[axis]:
            return j
        prefix *= size
    return None


def analyze(nodes: list[fx.Node], hidden_in: fx.Node, where: str) -> TokenAxes:
    """Token axes of every node in ``nodes`` that depends on ``hidden_in`` ([B, N, D], axis 1)."""
    batch, num_tokens = (int(s) for s in _val(hidden_in).shape[:2])
    result = TokenAxes({hidden_in: 1}, num_tokens)
    for node in nodes:
        if node.op != "call_function":
            continue
        deps = [a for a in node.all_input_nodes if result.depends(a)]
        if not deps:
            continue
        if not any(a in result.axis for a in deps):
            result.derived.add(node)  # computed from derived values only
            continue
        axis = _rule(node, result, where)
        if axis is None:
            result.derived.add(node)
            result.pad.pop(node, None)
            continue
        result.axis[node] = axis
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and (val.dim() == 0 or val.shape[0] != batch):
            raise UnsupportedBlockError(
                f"{where}: {node.format_node()} moves the batch axis (shape {tuple(val.shape)}); token "
                "caching selects tokens per batch row and needs the batch on axis 0. Attention processors "
                "that fold the heads into the batch axis do this (diffusers' AttnProcessor, which "
                "set_default_attn_processor installs): use AttnProcessor2_0 (scaled_dot_product_attention), "
                "or a plan that caches no block."
            )
    return result


def _unsupported(node: fx.Node, where: str, why: str) -> UnsupportedBlockError:
    return UnsupportedBlockError(
        f"{where}: cannot token-cache through {node.target} ({node.name}): {why}. "
        "Exclude this block from plan.blocks, or teach tcpass.passes.token_axis this op."
    )


def _set_pad(ta: TokenAxes, node: fx.Node, pad) -> None:
    if pad is not None and pad != (0, 0):
        ta.pad[node] = pad


def _segments(node: fx.Node, ta: TokenAxes, src: fx.Node, ranges: list[tuple[int, int]], where: str):
    """Token axis (or ``None``: derived) of each piece ``[start, end)`` cut from ``src``'s token axis."""
    before = ta.pad_of(src)[0]
    image = (before, before + ta.num_tokens)
    out: list[int | None] = []
    for start, end in ranges:
        if (start, end) == image:
            out.append(ta.axis[src])  # exactly the image tokens
        elif end <= image[0] or start >= image[1]:
            out.append(None)  # text positions only: derived
        else:
            raise _unsupported(node, where, f"it cuts the image tokens [{image[0]}, {image[1]}) apart")
    return tuple(out)


def _rule(node: fx.Node, ta: TokenAxes, where: str) -> int | tuple[int | None, ...] | None:
    t = node.target
    axes = ta.axis
    if t is operator.getitem:
        parent, i = node.args[0], node.args[1]
        parent_axes = axes[parent]
        if not isinstance(parent_axes, tuple):
            raise _unsupported(node, where, "indexing a tensor")
        pads = ta.pad.get(parent)
        if pads is not None and parent_axes[i] is not None:
            _set_pad(ta, node, pads[i])
        return parent_axes[i]
    if t is aten.cat.default:
        return _cat_axis(node, ta, where)
    if t is aten.stack.default:
        rank_out = _val(node).dim()
        d = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank_out)
        a = _broadcast_axis(node, ta, where, rank_out - 1)
        return a + 1 if d <= a else a
    src = node.args[0]
    if src not in axes and (t in _PRESERVING or t in RESHAPES or t in _SPLITS or t in _FLAT_RESHAPES):
        raise _unsupported(node, where, "token-dependent weight or shape argument")
    a = axes.get(src) if isinstance(src, fx.Node) else None
    rank_in = _val(src).dim() if isinstance(src, fx.Node) else 0
    if isinstance(src, fx.Node) and src in axes and t is not SDPA:
        _set_pad(ta, node, ta.pad.get(src))  # single-input ops keep the padding; overridden below
    if t in RESHAPES or t in _FLAT_RESHAPES or t in _MOVES:
        return _moved_axis(node, src, a, rank_in, where)
    if t in _PRESERVING:
        if t is not aten.linear.default and a >= rank_in - len(node.args[1]):
            raise _unsupported(node, where, "normalization over the token axis")
        if t is aten.linear.default and a == rank_in - 1:
            raise _unsupported(node, where, "linear over the token axis")
        return a
    if t is aten.type_as.default:  # the second argument gives only the dtype
        return a
    if t in _REDUCTIONS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            raise _unsupported(node, where, "a reduction over every axis")
        dims = [_norm_dim(d, rank_in) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if a in dims:
            raise _unsupported(node, where, "a reduction over the token axis")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return a if keepdim else a - sum(d < a for d in dims)
    if t is aten.slice.Tensor:
        return _slice_axis(node, ta, src, a, rank_in, where)
    if t in _SPLITS:
        return _split_axes(node, ta, src, a, rank_in, where)
    if t is SDPA:
        return _attention_axis(node, ta, where)
    if isinstance(t, torch._ops.OpOverload) and (torch.Tag.pointwise in t.tags or t in _ELEMENTWISE):
        return _broadcast_axis(node, ta, where, _val(node).dim())
    raise _unsupported(node, where, "op not known to be token-wise")


def _moved_axis(node: fx.Node, src: fx.Node, a: int, rank_in: int, where: str) -> int:
    """Where a reshape, transpose, permute, unsqueeze or expand puts the token axis ``a`` of ``src``."""
    t = node.target
    if t is aten.transpose.int:
        d0, d1 = (_norm_dim(d, rank_in) for d in node.args[1:3])
        return d1 if a == d0 else d0 if a == d1 else a
    if t is aten.permute.default:
        return [_norm_dim(d, rank_in) for d in node.args[1]].index(a)
    if t is aten.unsqueeze.default:
        d = _norm_dim(node.args[1], rank_in + 1)
        return a + 1 if d <= a else a
    if t is aten.expand.default:
        return a + len(node.args[1]) - rank_in
    out = _reshape_axis(tuple(_val(src).shape), a, tuple(_val(node).shape))
    if out is None:
        raise _unsupported(node, where, "the reshape splits or merges the token axis")
    return out


def _slice_axis(node: fx.Node, ta: TokenAxes, src: fx.Node, a: int, rank_in: int, where: str) -> int | None:
    """A slice: the token axis unchanged, or (slicing it) the segment of image/text positions it keeps."""
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, rank_in)
    if dim != a:
        return a
    step = node.args[4] if len(node.args) > 4 else 1
    length = int(_val(src).shape[a])
    start, end = (node.args[2:4] + (None, None))[:2] if len(node.args) > 2 else (None, None)
    start, end, _ = slice(start, end).indices(length)
    if step != 1:
        raise _unsupported(node, where, "a strided slice of the token axis")
    if (start, end) == (0, length):
        return a
    ta.pad.pop(node, None)
    return _segments(node, ta, src, [(start, end)], where)[0]


def _split_axes(node: fx.Node, ta: TokenAxes, src: fx.Node, a: int, rank_in: int, where: str) -> tuple[int | None, ...]:
    """A split/chunk/unbind: each piece's token axis (splitting the token axis: the segment each piece holds)."""
    t = node.target
    dim_arg = node.args[1] if t is aten.unbind.int else node.args[2] if len(node.args) > 2 else None
    dim = _norm_dim(node.kwargs.get("dim", 0) if dim_arg is None else dim_arg, rank_in)
    pieces = list(_val(node))
    if dim != a:
        out = a - 1 if t is aten.unbind.int and dim < a else a
        if src in ta.pad:
            ta.pad[node] = tuple(ta.pad[src] for _ in pieces)
        return tuple(out for _ in pieces)
    if t is aten.unbind.int:
        raise _unsupported(node, where, "unbinding the token axis")
    ta.pad.pop(node, None)
    bounds = list(itertools.accumulate((int(p.shape[dim]) for p in pieces), initial=0))
    return _segments(node, ta, src, list(itertools.pairwise(bounds)), where)


def _attention_axis(node: fx.Node, ta: TokenAxes, where: str) -> int:
    """Scaled dot-product attention: queries, keys and values must hold tokens on axis -2 (or be constant),
    and a mask may not depend on image tokens or vary over queries; a mask over keys is recorded in
    ``key_masks`` (the ``kept_only`` rewrite, which drops keys, refuses it)."""
    axes = ta.axis
    q, k, v = node.args[:3]
    rank = _val(q).dim()
    for name, arg in (("query", q), ("key", k), ("value", v)):
        if arg in axes and axes[arg] != rank - 2:
            raise _unsupported(node, where, f"{name} tokens are not on axis -2")
        if arg in ta.derived:
            raise _unsupported(node, where, f"the {name} is derived from image tokens without holding them")
    if q not in axes:
        raise _unsupported(node, where, "queries do not come from the block's tokens")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        shape = tuple(_val(mask).shape)
        if ta.depends(mask):
            raise _unsupported(node, where, "the attention mask depends on the image tokens")
        if len(shape) >= 2 and shape[-2] != 1:
            raise _unsupported(node, where, f"the attention mask {shape} varies over queries")
        if k in axes and shape[-1] != 1:
            ta.key_masks.add(node)  # a padding mask over all keys (HunyuanVideo): kept as is while keys stay whole
    _set_pad(ta, node, ta.pad.get(q))
    ta.attention.append(node)
    return rank - 2


def _cat_axis(node: fx.Node, ta: TokenAxes, where: str) -> int:
    tensors = list(node.args[0])
    rank = _val(node).dim()
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
    token = [x for x in tensors if x in ta.axis]
    if any(ta.axis[x] != dim for x in token):
        return _broadcast_axis(node, ta, where, rank, tensors)  # concatenating features: token-wise
    if len(token) != 1:
        raise _unsupported(node, where, "it concatenates the image tokens of several tensors")
    (x,) = token
    i = tensors.index(x)
    before, after = ta.pad_of(x)
    before += sum(int(_val(t).shape[dim]) for t in tensors[:i])
    after += sum(int(_val(t).shape[dim]) for t in tensors[i + 1 :])
    _set_pad(ta, node, (before, after))
    return dim


def _broadcast_axis(
    node: fx.Node, ta: TokenAxes, where: str, out_rank: int, tensor_args: list[fx.Node] | None = None
) -> int:
    """Token axis of an op that broadcasts its inputs to rank ``out_rank`` (pointwise, stack, cat of features)."""
    if tensor_args is None:
        tensor_args = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    candidates = {(ta.axis[a] + out_rank - _val(a).dim(), ta.pad_of(a)) for a in tensor_args if a in ta.axis}
    if len(candidates) != 1:
        raise _unsupported(node, where, f"inputs disagree on the token axis {sorted(candidates)}")
    axis, pad = candidates.pop()
    _set_pad(ta, node, pad)
    length = pad[0] + ta.num_tokens + pad[1]
    for arg in tensor_args:
        if arg in ta.axis:
            continue
        arg_axis = axis - (out_rank - _val(arg).dim())
        if arg_axis >= 0 and _val(arg).shape[arg_axis] == length and length != 1:
            ta.gathered_constants[(node, arg)] = arg_axis
    return axis
