"""The cache layout shared by the FULL and CACHED graphs, and graph plumbing used by every pass.

Both step graphs agree on one ordered list of cache tensors (`tcpass.contracts.TensorSpec`). First,
when the plan skips steps:

- ``stack.residual``    [B, N, D]: ``last block out - first block in`` of the last computed step
  (``skip.level="stack"``), or the model output [B, C, H, W] (``skip.level="output"``); the SKIP
  graph reads it (`tcpass.passes.skip_step`).

then, per cached block:

- ``block{b}.delta``    [B, N, D]: residual update ``block_out - block_in`` of every token.
- ``block{b}.attn{j}.key`` / ``.value`` [B, H, N, d]: keys/values of self-attention ``j``
  (``attention="cached_kv"`` only).
- the token policy's caches of the block (`tcpass.policies`: ``block{b}.input`` for
  ``input_change``, ``block{b}.score`` for ``toca``),
- the forecaster's caches of the block (`tcpass.forecasters`: ``taylor`` keeps older residuals and
  per-token timestamps),

then the policy's graph-wide caches (``predictor.input`` for ``dynamic``).

The FULL graph returns them after the model output; the CACHED graph takes them as inputs (after
the model inputs, before any kept-index inputs) and returns their updated values in the same order.
The FULL graph also takes as inputs the caches a forecaster carries over (a history it shifts), in
the same order, after the model inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tcpass.contracts import TensorSpec, block_cache
from tcpass.passes.token_axis import SDPA, TokenAxes
from tcpass.trace import BlockSpan

if TYPE_CHECKING:
    from tcpass.forecasters import TokenForecaster
    from tcpass.policies import TokenPolicy


def block_caches(
    span: BlockSpan, ta: TokenAxes, attention: str, policy: TokenPolicy, forecaster: TokenForecaster | None = None
) -> list[TensorSpec]:
    """The caches of one block, in layout order: its delta, its K/V (``cached_kv``), the policy's, then
    the forecaster's."""
    b = span.index
    val = span.hidden_out.meta["val"]
    specs = [TensorSpec(block_cache(b, "delta"), b, "delta", tuple(val.shape), val.dtype)]
    if attention == "cached_kv":
        for j, node in enumerate(ta.self_attentions()):
            for kind, arg in (("key", node.args[1]), ("value", node.args[2])):
                v = arg.meta["val"]
                specs.append(TensorSpec(block_cache(b, f"attn{j}.{kind}"), b, kind, tuple(v.shape), v.dtype, node.name))
    specs += policy.block_caches(span, ta)
    return specs + (forecaster.block_caches(specs[0]) if forecaster is not None else [])


def timestep_node(graph: fx.Graph, name: str | None) -> fx.Node | None:
    """The placeholder of the model's timestep input ``name`` (None if there is none)."""
    return next((n for n in graph.nodes if n.op == "placeholder" and n.target == name), None)


def add_placeholders(graph: fx.Graph, specs: list[TensorSpec]) -> dict[str, fx.Node]:
    """Append one placeholder per spec after the existing ones."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    nodes = {}
    for spec in specs:
        with graph.inserting_after(last):
            last = graph.placeholder(spec.placeholder_name)
        nodes[spec.name] = last
    return nodes


def append_outputs(graph: fx.Graph, extra: list[fx.Node]) -> None:
    """Make the graph return ``(*original outputs, *extra)``."""
    out = graph.output_node()
    (values,) = out.args
    out.args = (tuple(values) + tuple(extra),)


def finalize(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> fx.GraphModule:
    """Dead-code-eliminate, lint, recompile and fill ``meta["val"]`` of every node by fake propagation."""
    gm.graph.eliminate_dead_code(is_impure_node=mutates)
    gm.graph.lint()
    gm.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*example_inputs)
    return gm


_ALLOCATIONS = {
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.zeros.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_zeros.default,
}


def mutates(node: fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing uses its value.

    ATen marks random-capable ops (dropout, SDPA with its dropout_p) impure, which would keep the
    replaced full-token computation alive; in these functional graphs only mutation is a side effect,
    and only where someone can see it: a write into a tensor the graph itself allocated (Wan's rotary
    embedding fills the even and odd channels of an ``empty_like``) is dead once nothing reads that
    tensor any more, as when a SKIP graph drops the blocks that computed it.
    """
    if node.op in ("placeholder", "output"):
        return True
    target = node.target
    if not (isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable):
        return False
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return True
    base = node.args[0]
    while base.op == "call_function" and isinstance(base.target, torch._ops.OpOverload) and base.target.is_view:
        base = base.args[0]
    return base.target not in _ALLOCATIONS or _read(base, set())


def _read(node: fx.Node, seen: set[fx.Node]) -> bool:
    """Whether any node reads ``node``'s storage other than by writing into it (views followed)."""
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        target = user.target
        aliases = isinstance(target, torch._ops.OpOverload) and (
            (target._schema.is_mutable and user.args[0] is node) or target.is_view
        )
        if aliases:  # a write into it or a view of it: its result aliases the storage
            if _read(user, seen):
                return True
            continue
        return True
    return False


def attention_kv_sources(ta: TokenAxes, nodes: list[fx.Node]) -> set[fx.Node]:
    """Token-dependent nodes that self-attention keys/values are computed from (keys/values included)."""
    needed: set[fx.Node] = set()
    frontier = [arg for node in ta.self_attentions() for arg in node.args[1:3]]
    inside = set(nodes)
    while frontier:
        node = frontier.pop()
        if node in needed or node not in ta.axis or node not in inside:
            continue
        needed.add(node)
        frontier.extend(node.all_input_nodes)
    return needed


def is_self_attention(node: fx.Node, ta: TokenAxes) -> bool:
    return node.target is SDPA and node.args[1] in ta.axis and node.args[2] in ta.axis
