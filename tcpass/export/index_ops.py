"""ONNX rewrite: per-row token gather/scatter as slice copies (GatherND/ScatterND) instead of per element.

The passes broadcast each ``[B, K]`` kept-index tensor to the full layout of the tensor it indexes
(``view`` + ``expand``, see `tcpass.passes.emit`), which the exporter turns into::

    idx [B, K] -> Reshape [B, 1, K, 1] -> Expand [B, H, K, D] -> ScatterElements(cache, axis=2, ., rows)

ONNX Runtime's ScatterElements/GatherElements compute one offset per element (B*H*K*D of them) and
copy element by element; on DiT-S that was ~23% of a CACHED step on CPU. Every element of a row
has the same index, so the same op is a copy of whole rows::

    idx [B, K] -> Reshape [B, 1, K, 1] -> Expand [B, H, K, 1] -> Concat(b, h, idx) [B, H, K, 3]
    -> ScatterND(cache, ., rows)                 # B*H*K copies of D contiguous elements

Gathers become ``GatherND(x, [B, .., K, axis], batch_dims=1)``. The rewrite only matches that exact
broadcast (index constant along every axis but the batch and the token axis, full extent on every
other axis), so it moves the same elements and the results are bit-identical.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_GATHER, _SCATTER = "GatherElements", "ScatterElements"


def rows_as_slices(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite broadcast-index GatherElements/ScatterElements as GatherND/ScatterND; returns (model, count)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = _static_shapes(inferred.graph)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {
        t.name: numpy_helper.to_array(t)
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.INT64 and t.data_location != onnx.TensorProto.EXTERNAL
    }
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    built: dict[tuple, str] = {}  # one coordinate tensor per (indices, axis, layout, op)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    count = 0
    for node in graph.node:
        match = _match(node, producer, constants, shapes) if node.op_type in (_GATHER, _SCATTER) else None
        if match is None:
            new_nodes.append(node)
            continue
        indices, axis, data_shape, k = match
        scatter = node.op_type == _SCATTER
        key = (indices, axis, tuple(data_shape[:axis]), scatter)
        if key not in built:
            prefix = f"{indices}_rows{len(built)}"  # new tensor names, one set per key
            built[key] = _coordinates(indices, axis, data_shape, k, scatter, prefix, new_nodes, new_inits)
        if scatter:
            replacement = helper.make_node(
                "ScatterND", [node.input[0], built[key], node.input[2]], list(node.output), name=node.name
            )
        else:
            replacement = helper.make_node(
                "GatherND", [node.input[0], built[key]], list(node.output), name=node.name, batch_dims=1
            )
        new_nodes.append(replacement)
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(new_inits)
        _remove_dead(graph)
    return model, count


def _static_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    shapes = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [d.dim_value for d in dims]
    for tensor in graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def _match(node, producer, constants, shapes) -> tuple[str, int, list[int], int] | None:
    """(kept indices [B, K], axis, data shape, K) if ``node`` indexes whole rows with a broadcast [B, K]."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("reduction", b"none") not in (b"none", "none"):
        return None
    expand = producer.get(node.input[1])
    if expand is None or expand.op_type != "Expand":
        return None
    reshape = producer.get(expand.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    indices = reshape.input[0]
    data_shape = shapes.get(node.input[0])
    index_shape = shapes.get(indices)
    view = constants.get(reshape.input[1])
    target = constants.get(expand.input[1])
    if data_shape is None or index_shape is None or view is None or target is None or len(index_shape) != 2:
        return None
    rank = len(data_shape)
    axis = attrs.get("axis", 0) % rank
    batch, k = index_shape
    if axis == 0 or data_shape[0] != batch:
        return None
    view_want = [1] * rank
    view_want[0], view_want[axis] = batch, k
    target_want = list(data_shape)
    target_want[axis] = k
    if view.tolist() != view_want or target.tolist() != target_want:
        return None
    return indices, axis, data_shape, k


def _coordinates(indices, axis, data_shape, k, scatter, prefix, nodes, inits) -> str:
    """[B, d1..d(axis-1), K, n] int64 coordinates of each kept row; n = axis (+1 with the batch for ScatterND)."""
    batch, middle = data_shape[0], list(data_shape[1:axis])
    layout = [batch, *middle, k, 1]

    def const(suffix: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.int64), f"{prefix}_{suffix}"))
        return f"{prefix}_{suffix}"

    column = f"{prefix}_token"
    nodes.append(helper.make_node("Reshape", [indices, const("view", [batch, *[1] * len(middle), k, 1])], [column]))
    if middle:
        nodes.append(helper.make_node("Expand", [column, const("layout", layout)], [f"{column}_full"]))
        column = f"{column}_full"
    grids = []  # coordinates of the axes before the token axis: constants, shapes are static
    for dim in range(0 if scatter else 1, axis):
        view = [1] * len(layout)
        view[dim] = data_shape[dim]
        grid = np.broadcast_to(np.arange(data_shape[dim]).reshape(view), layout)
        grids.append(const(f"axis{dim}", grid))
    if not grids:
        return column
    out = f"{prefix}_coords"
    nodes.append(helper.make_node("Concat", [*grids, column], [out], axis=-1))
    return out


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and shape records nothing reads any more (the replaced Reshape/Expand chains)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # subgraphs read outer names implicitly; not worth tracking for a cleanup
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in live for out in node.output):
            kept.append(node)
            live.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [t for t in graph.initializer if t.name not in live]
    for tensor in unused:
        graph.initializer.remove(tensor)
    produced = {out for node in graph.node for out in node.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for info in stale:
        graph.value_info.remove(info)


def in_place_updates(model: onnx.ModelProto) -> dict[str, str]:
    """{graph output: graph input} pairs a runtime may bind to one buffer: the output is a ScatterND of the input.

    A cache refreshed by ``ScatterND(cache, rows, new)`` only needs its K new rows written when the
    output buffer is the input buffer (ONNX Runtime's CPU and CUDA ScatterND skip the copy then).
    That is safe only if every other reader of the input runs before the scatter, i.e. is one of
    its ancestors (the ``input_change`` selector reads ``block{b}.input`` to choose the rows).
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return {}  # subgraphs read outer names implicitly
    inputs = {i.name for i in graph.input}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    pairs = {}
    for output in graph.output:
        node = producer.get(output.name)
        if node is None or node.op_type != "ScatterND" or node.input[0] not in inputs:
            continue
        others = [r for r in readers[node.input[0]] if r is not node]
        if others and not _are_ancestors(others, node, producer):
            continue
        pairs[output.name] = node.input[0]
    return pairs


def _are_ancestors(nodes: list[onnx.NodeProto], of: onnx.NodeProto, producer) -> bool:
    seen: set[int] = set()
    stack = [of]
    while stack:
        for name in stack.pop().input:
            parent = producer.get(name)
            if parent is not None and id(parent) not in seen:
                seen.add(id(parent))
                stack.append(parent)
    return all(id(n) in seen for n in nodes)
