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
- the token selector's caches of the block (`tcpass.selectors`: ``block{b}.input`` for
  ``input_change``, ``block{b}.score`` for ``toca``),
- the forecaster's caches of the block (`tcpass.forecasters`: ``taylor`` keeps older residuals and
  per-token timestamps),

then the selector's graph-wide caches (``predictor.input`` for ``dynamic``).

The FULL graph returns them after the model output; the CACHED graph takes them as inputs (after
the model inputs, before any kept-index inputs) and returns their updated values in the same order.
The FULL graph also takes as inputs the caches a forecaster carries over (a history it shifts), in
the same order, after the model inputs.
"""

from __future__ import annotations

import operator
import threading
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import snapshot_fake
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tcpass.contracts import TensorSpec, block_cache
from tcpass.passes.emit import SIGNATURE
from tcpass.passes.token_axis import SDPA, TokenAxes
from tcpass.trace import BlockSpan

if TYPE_CHECKING:
    from tcpass.forecasters import TokenForecaster
    from tcpass.selectors import TokenSelector


def block_caches(
    span: BlockSpan, ta: TokenAxes, attention: str, selector: TokenSelector, forecaster: TokenForecaster | None = None
) -> list[TensorSpec]:
    """The caches of one block, in layout order: its delta, its K/V (``cached_kv``), the selector's, then
    the forecaster's."""
    b = span.index
    val = span.hidden_out.meta["val"]
    specs = [TensorSpec(block_cache(b, "delta"), b, "delta", tuple(val.shape), val.dtype)]
    if attention == "cached_kv":
        for j, node in enumerate(ta.self_attentions()):
            for kind, arg in (("key", node.args[1]), ("value", node.args[2])):
                v = arg.meta["val"]
                specs.append(TensorSpec(block_cache(b, f"attn{j}.{kind}"), b, kind, tuple(v.shape), v.dtype, node.name))
    specs += selector.block_caches(span, ta)
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
    """Dead-code-eliminate, lint, recompile and fill ``meta["val"]`` of every node by fake propagation.

    The trace is propagated in full; the passes' copies of it keep their nodes' values, and only the nodes a
    pass emitted or rewired, and what their values reach, are propagated again (`stamp`). The values are
    those a full ``FakeTensorProp`` gives (``tests/test_golden.py`` compares them on the step graphs of
    several plans and families).
    """
    gm.graph.eliminate_dead_code(is_impure_node=mutates)
    gm.graph.lint()
    gm.recompile()
    with _PROPAGATING:
        if not (SIGNATURE in gm.meta and _propagate_changed(gm, example_inputs)):
            FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
            stamp(gm)
    return gm


_PROPAGATING = threading.Lock()  # step graphs of one trace share its fake tensor mode


def stamp(gm: fx.GraphModule) -> None:
    """Record, per node with a value, what it was computed from: its target, its non-tensor arguments, and
    the shape, stride, dtype, device and storage of each tensor argument. `finalize` propagates a node again
    only when that changed (or it has no value), so a pass's copies of a stamped trace re-propagate only
    what the pass changed. `finalize` stamps each graph it propagated in full (the trace, first)."""
    gm.meta[SIGNATURE] = True  # copies of ``gm`` (`tcpass.trace.copy_graph_module`) carry it
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" in node.meta:
            signature = _signature(node)
            if signature is not None:
                node.meta[SIGNATURE] = signature


def _propagate_changed(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> bool:
    """Fake-propagate the nodes whose signature changed, in the fake mode of the values the graph holds;
    False (having changed nothing that a full propagation does not redo) where that cannot be done."""
    graph = gm.graph
    modes = {id(v.fake_mode): v.fake_mode for n in graph.nodes for v in _tensors(n.meta.get("val"))}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(modes) != 1 or len(placeholders) != len(example_inputs):
        return False
    (mode,) = modes.values()
    for node, example in zip(placeholders, example_inputs, strict=True):
        _refresh(node, example, mode)
    with mode:
        for node in graph.nodes:
            if node.op == "get_attr":
                attribute = operator.attrgetter(node.target)(gm)
                if not isinstance(attribute, torch.Tensor):  # a submodule (a higher-order op's graph)
                    return False
                _refresh(node, attribute, mode)
            elif node.op == "call_function":
                signature = _signature(node)
                if signature is None:
                    return False
                if node.meta.get(SIGNATURE) != signature or "val" not in node.meta:
                    _propagate(node, mode)
                    node.meta[SIGNATURE] = signature
            elif node.op == "output":  # as FakeTensorProp leaves it: the returned values
                returned = map_arg(node.args[0], lambda a: a.meta["val"])
                node.meta["val"] = map_aggregate(returned, _snapshot)
            elif node.op != "placeholder":
                return False
    return True


def _propagate(node: fx.Node, mode: FakeTensorMode) -> None:
    """Fake-run ``node`` on its arguments' values. A stamped node keeps its old value where the new one has
    its layout and aliases no argument (a fresh tensor): users' signatures, which name storages, then hold."""
    args, kwargs = map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
    result = node.target(*args, **kwargs)
    new = map_aggregate(result, _snapshot)
    old = node.meta.get("val")
    inputs = {_storage_id(v) for a in node.all_input_nodes for v in _tensors(a.meta["val"])}
    keep = (
        SIGNATURE in node.meta
        and _layout(old) == _layout(new)
        and all(v.fake_mode is mode for v in _tensors(old))
        and not any(_storage_id(v) in inputs for v in _tensors(new))
    )
    if not keep:
        node.meta["val"] = new


def _snapshot(value):
    return snapshot_fake(value) if isinstance(value, FakeTensor) else value


def _refresh(node: fx.Node, value: torch.Tensor, mode: FakeTensorMode) -> None:
    """A placeholder's or attribute's value, made anew unless the one it has is in ``mode`` and laid out alike."""
    val = node.meta.get("val")
    if not (isinstance(val, FakeTensor) and val.fake_mode is mode and _layout(val) == _layout(value)):
        node.meta["val"] = mode.from_tensor(value, static_shapes=True)


def _signature(node: fx.Node) -> tuple | None:
    """``(target, args, kwargs)`` with each node argument as its value's layout and storages; None if one has
    no value."""
    missing = []

    def describe(a: fx.Node):
        if "val" not in a.meta:
            missing.append(a)
            return None
        val = a.meta["val"]
        return (_layout(val), tuple(_storage_id(v) for v in _tensors(val)))

    args, kwargs = map_arg((node.args, node.kwargs), describe)
    return None if missing else (node.target, args, kwargs)


def _layout(value) -> object:
    """Shape, stride, offset, dtype and device of each tensor in ``value``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return tuple(_layout(v) for v in value)
    return value


def _tensors(value) -> list[FakeTensor]:
    if isinstance(value, FakeTensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _storage_id(value: torch.Tensor) -> int:
    return value.untyped_storage()._cdata


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
