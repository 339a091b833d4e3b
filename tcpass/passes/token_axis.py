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
"""

from __future__ import annotations

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
    aten.type_as.default,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_PRESERVING = {aten.linear.default, aten.layer_norm.default, aten.rms_norm.default}
_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
SDPA = aten.scaled_dot_product_attention.default


class UnsupportedBlockError(ValueError):
    """A block contains an op that token caching cannot rewrite."""


@dataclass
class TokenAxes:
    """Result of `analyze`: token axis per token-dependent node, plus constants to gather.

    Attributes:
        axis: node -> token axis (int), or a tuple of axes for multi-output nodes (chunk, split).
        num_tokens: N, the token count of the block input.
        gathered_constants: ``(user, arg)`` pairs where a tensor that does not depend on the block
            input still has N tokens along the user's token axis (a positional table, a mask); the
            rewrite gathers it too.
        attention: the attention nodes of the block.
    """

    axis: dict[fx.Node, int | tuple[int, ...]]
    num_tokens: int
    gathered_constants: dict[tuple[fx.Node, fx.Node], int] = field(default_factory=dict)
    attention: list[fx.Node] = field(default_factory=list)


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
        token_args = [a for a in node.all_input_nodes if a in result.axis]
        if not token_args:
            continue
        axis = _rule(node, result, where)
        result.axis[node] = axis
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and (val.dim() == 0 or val.shape[0] != batch):
            raise UnsupportedBlockError(
                f"{where}: {node.format_node()} moves the batch axis (shape {tuple(val.shape)}); token "
                "caching selects tokens per batch row and needs the batch on axis 0."
            )
    return result


def _unsupported(node: fx.Node, where: str, why: str) -> UnsupportedBlockError:
    return UnsupportedBlockError(
        f"{where}: cannot token-cache through {node.target} ({node.name}): {why}. "
        "Exclude this block from plan.blocks, or teach tcpass.passes.token_axis this op."
    )


def _rule(node: fx.Node, ta: TokenAxes, where: str) -> int | tuple[int, ...]:
    t = node.target
    axes = ta.axis
    if t is operator.getitem:
        parent_axes = axes[node.args[0]]
        return parent_axes[node.args[1]] if isinstance(parent_axes, tuple) else parent_axes
    src = node.args[0]
    if src not in axes and (t in _PRESERVING or t in _RESHAPES or t in _SPLITS):
        raise _unsupported(node, where, "token-dependent weight or shape argument")
    a = axes.get(src) if isinstance(src, fx.Node) else None
    rank_in = _val(src).dim() if isinstance(src, fx.Node) else 0
    if t in _RESHAPES:
        out = _reshape_axis(tuple(_val(src).shape), a, tuple(_val(node).shape))
        if out is None:
            raise _unsupported(node, where, "the reshape splits or merges the token axis")
        return out
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
    if t in _PRESERVING:
        if t is not aten.linear.default and a >= rank_in - len(node.args[1]):
            raise _unsupported(node, where, "normalization over the token axis")
        if t is aten.linear.default and a == rank_in - 1:
            raise _unsupported(node, where, "linear over the token axis")
        return a
    if t in _SPLITS:
        dim = _norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), rank_in)
        if dim == a:
            raise _unsupported(node, where, "split along the token axis")
        return tuple(a for _ in _val(node))
    if t is SDPA:
        q, k, v = node.args[:3]
        rank = _val(q).dim()
        for name, arg in (("query", q), ("key", k), ("value", v)):
            if arg in axes and axes[arg] != rank - 2:
                raise _unsupported(node, where, f"{name} tokens are not on axis -2")
        if len(node.args) > 3 and node.args[3] is not None or node.kwargs.get("attn_mask") is not None:
            raise _unsupported(node, where, "attention masks are not supported yet")
        if q not in axes:
            raise _unsupported(node, where, "queries do not come from the block's tokens")
        ta.attention.append(node)
        return rank - 2
    if isinstance(t, torch._ops.OpOverload) and (torch.Tag.pointwise in t.tags or t in _ELEMENTWISE):
        return _broadcast_axis(node, ta, where)
    raise _unsupported(node, where, "op not known to be token-wise")


def _broadcast_axis(node: fx.Node, ta: TokenAxes, where: str) -> int:
    out_rank = _val(node).dim()
    tensor_args = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    candidates = {ta.axis[a] + out_rank - _val(a).dim() for a in tensor_args if a in ta.axis}
    if len(candidates) != 1:
        raise _unsupported(node, where, f"inputs disagree on the token axis {sorted(candidates)}")
    axis = candidates.pop()
    for arg in tensor_args:
        if arg in ta.axis:
            continue
        arg_axis = axis - (out_rank - _val(arg).dim())
        if arg_axis >= 0 and _val(arg).shape[arg_axis] == ta.num_tokens and ta.num_tokens != 1:
            ta.gathered_constants[(node, arg)] = arg_axis
    return axis
