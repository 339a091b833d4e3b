"""Write-back pass: step graphs write their caches into caller-owned buffers instead of returning them.

The caching passes return caches as outputs, so every call hands back new tensors at new
addresses. Static buffers make the addresses stable for good: what CUDA graphs
(``torch.compile(mode="reduce-overhead")``) need, and a FULL step no longer allocates the caches.
This is only a change of calling convention; the values written are exactly the graph's outputs.

Before (FULL)::

    def forward(x, t):
        ...
        delta = y - x1
        return (sample, delta)

After::

    def forward(x, t, block3_delta):                 # one buffer per cache, in layout order
        ...
        delta = y - x1
        copy_(block3_delta, delta)                   # right after the value exists
        return (sample,)

A FULL graph that shifts a forecaster's history (``older = clone(block3_delta)``, the buffer's value
before the call) copies buffer to buffer first, oldest entry first, and leaves no clone (inductor may
read a clone of a buffer after the buffer's own write)::

    def forward(x, t, block3_delta, block3_delta_1):
        copy_(block3_delta_1, block3_delta)
        ...
        copy_(block3_delta, delta)
        return (sample,)

Before (CACHED, after `tcpass.passes.reinplace`)::

    def forward(x, t, block3_delta, block4_delta):
        ...
        block3_delta_next = scatter_(block3_delta, 1, idx, rows)   # already written in place
        return (sample, block3_delta_next, block4_delta)           # block 4 passes through (K = 0)

After::

    def forward(x, t, block3_delta, block4_delta):
        ...
        scatter_(block3_delta, 1, idx, rows)
        return (sample,)

A CACHED update that is neither in place nor a pass-through is copied into its buffer just before
the output, after every read of the old cache.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from tcpass.contracts import TensorSpec
from tcpass.passes.layout import add_placeholders
from tcpass.trace import copy_graph_module

aten = torch.ops.aten


def write_caches_back(gm: fx.GraphModule, cache_specs: list[TensorSpec]) -> fx.GraphModule:
    """A copy of ``gm`` that writes its cache outputs into cache inputs and returns only the model outputs.

    ``gm`` returns ``(*model_outputs, *caches)`` in ``cache_specs`` order. A graph without (all) its
    cache inputs (FULL) gets the missing ones, all of them in layout order after its inputs; the result
    is called as
    ``(*model_inputs, *cache_buffers, *kept_indices)`` and returns ``model_outputs``.
    """
    gm = copy_graph_module(gm)
    graph = gm.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    missing = [s for s in cache_specs if s.placeholder_name not in placeholders]
    if missing:  # FULL: every cache but the ones it reads (a forecaster's history) becomes an input
        added = add_placeholders(graph, missing)
        buffers = {s.name: added.get(s.name) or placeholders[s.placeholder_name] for s in cache_specs}
        names = {s.placeholder_name for s in cache_specs}
        anchor = [n for n in graph.nodes if n.op == "placeholder" and n.target not in names][-1]
        for spec in cache_specs:  # the buffers in layout order, after the model inputs
            anchor.append(buffers[spec.name])
            anchor = buffers[spec.name]
    else:
        buffers = {s.name: placeholders[s.placeholder_name] for s in cache_specs}
    output = graph.output_node()
    (values,) = output.args
    n_model = len(values) - len(cache_specs)
    buffer_storages = {_storage(b): b for b in buffers.values() if _storage(b) is not None}
    order = {node: i for i, node in enumerate(graph.nodes)}
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for spec, value in zip(cache_specs, values[n_model:], strict=True):
        buffer = buffers[spec.name]
        if value is buffer or _writes_into(value, buffer):
            continue
        if value.target is aten.clone.default and value.args[0] in buffers.values():
            # a history moving one place older (FULL, `tcpass.forecasters`): copy straight from the source
            # buffer before anything is written. Copies go in front of the ones already placed there, so an
            # older entry moves before the newer one lands on it (the layout lists a history newest first).
            with graph.inserting_after(last_input):
                graph.call_function(aten.copy_.default, (buffer, value.args[0]))
            continue
        storage = _storage(value)
        aliased = buffer_storages.get(storage) if storage is not None else None
        if aliased is not None:
            raise NotImplementedError(
                f"cache {spec.name} is updated to a view of the cache input {aliased.target}; "
                "write-back needs updates that are new tensors or in place."
            )
        # Nothing reads the old cache (so at every FULL step): write once the value is final, freeing it early.
        # Final means after the last in-place write into its storage (CogVideoX applies its rotary embedding to
        # a slice of the keys in place, after the keys exist).
        if buffer.users:
            where = graph.inserting_before(output)
        else:
            writes = [n for n in graph.nodes if storage is not None and _mutates(n, storage)]
            where = graph.inserting_after(max(value, buffer, *writes, key=order.__getitem__))
        with where:
            copy = graph.call_function(aten.copy_.default, (buffer, value))
        copy.meta.update({k: v for k, v in value.meta.items() if k in ("nn_module_stack", "stack_trace")})
    output.args = (tuple(values[:n_model]),)
    for value in values[n_model:]:  # the history clones copied from their buffers above
        if value.op == "call_function" and value.target is aten.clone.default and not value.users:
            graph.erase_node(value)
    graph.lint()
    gm.recompile()
    return gm


def _writes_into(node: fx.Node, buffer: fx.Node) -> bool:
    """Whether ``node`` is an in-place op on ``buffer`` (its first argument, written per the schema)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or not node.args or node.args[0] is not buffer:
        return False
    alias = target._schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def _mutates(node: fx.Node, storage: StorageWeakRef) -> bool:
    """Whether ``node`` writes in place into a tensor on ``storage`` (its first argument, per the schema)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not node.args:
        return False
    alias = target._schema.arguments[0].alias_info if target._schema.arguments else None
    first = node.args[0]
    if alias is None or not alias.is_write or not isinstance(first, fx.Node):
        return False
    written = _storage(first)
    return written is not None and written == storage


def _storage(node: fx.Node) -> StorageWeakRef | None:
    val = node.meta.get("val")
    return StorageWeakRef(val.untyped_storage()) if isinstance(val, torch.Tensor) else None
