"""Trace a model to an ATen-level FX graph and find its transformer blocks from node metadata.

`torch.export.export(strict=False)` records, on every node, the stack of modules that produced it
(``meta["nn_module_stack"]``). A transformer block is the contiguous run of nodes whose stack holds
the block module itself (``transformer_blocks.3``); no model-specific code is needed.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn


class UnsupportedModelError(ValueError):
    """The traced graph does not have the structure token caching needs."""


@dataclass
class BlockSpan:
    """One transformer block in a graph.

    Attributes:
        index: position among all blocks, in call order (what ``CachePlan.blocks`` refers to).
        path: module path, e.g. ``transformer_blocks.3``.
        nodes: the block's nodes, contiguous and in graph order.
        hidden_in: the residual-stream tensor entering the block, [batch, tokens, hidden].
        hidden_out: the residual-stream tensor leaving it, same shape.
    """

    index: int
    path: str
    nodes: list[fx.Node]
    hidden_in: fx.Node
    hidden_out: fx.Node
    side_outputs: tuple[fx.Node, ...] = ()  # other values used after the block (a joint block's text stream)

    @property
    def num_tokens(self) -> int:
        return int(self.hidden_in.meta["val"].shape[1])


def flatten_inputs(inputs: dict) -> dict[str, torch.Tensor]:
    """The tensors of ``forward`` keyword arguments, flattened the way ``torch.export`` names them.

    ``{"added_cond_kwargs": {"resolution": t}}`` becomes ``{"added_cond_kwargs_resolution": t}``,
    ``{"image_rotary_emb": (cos, sin)}`` becomes ``{"image_rotary_emb_0": cos, "image_rotary_emb_1": sin}``;
    ``None`` values are dropped (they are constants of the trace).
    """
    flat: dict[str, torch.Tensor] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update({f"{name}_{k}": v for k, v in flatten_inputs(value).items()})
        elif isinstance(value, (tuple, list)):  # CogVideoX's image_rotary_emb = (cos, sin)
            flat.update({f"{name}_{k}": v for k, v in flatten_inputs(dict(enumerate(value))).items()})
        elif value is not None and not isinstance(value, _CONSTANTS):
            raise TypeError(
                f"input {name!r}: expected a tensor, a dict or tuple of tensors, a Python number or None, "
                f"got {type(value).__name__}"
            )
    return flat


_CONSTANTS = (bool, int, float)


def constant_inputs(inputs: dict) -> tuple[tuple[str, bool | int | float], ...]:
    """The Python numbers among ``forward`` keyword arguments, flattened as `flatten_inputs` names tensors.

    ``torch.export`` bakes them into the trace (LTX-Video's ``num_frames``, ``height``, ``width`` and
    ``rope_interpolation_scale``): they are part of a graph's signature, like the tensors' shapes, so
    a call with other values is traced anew instead of running graphs built for the old ones.
    """
    found: list[tuple[str, bool | int | float]] = []
    for name, value in inputs.items():
        if isinstance(value, _CONSTANTS):
            found.append((name, value))
        elif isinstance(value, dict):
            found.extend((f"{name}_{k}", v) for k, v in constant_inputs(value))
        elif isinstance(value, (tuple, list)):
            found.extend((f"{name}_{k}", v) for k, v in constant_inputs(dict(enumerate(value))))
    return tuple(found)


IMAGE_TOKENS = "tcpass_image_tokens"  # GraphModule.meta key: N, the image-token count of the residual stream


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph; parameters are shared, not copied."""
    graph = fx.Graph()
    graph._codegen = copy.copy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copied = fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    return copied


_traces: dict | None = None  # (model id, inputs' names, shapes, dtypes, devices, N) -> (model, GraphModule)


@contextlib.contextmanager
def reusing_traces() -> Iterator[None]:
    """Within it, `export_graph` traces a model once per input signature (names, shapes, dtypes,
    devices) and hands out copies of that trace (parameters shared).

    Calibration transforms one model dozens of times with one set of shapes, one candidate plan
    each; ``torch.export`` is most of a small model's transform time. Use it as a context manager or
    a decorator, only while the model's structure (modules, attention processors) does not change:
    the trace reads the weights by reference, but a swapped module would not be seen.
    """
    global _traces
    outer = _traces
    if outer is None:
        _traces = {}
    try:
        yield
    finally:
        if outer is None:
            _traces = None


def export_graph(model: nn.Module, inputs: dict, image_tokens: int | None = None) -> fx.GraphModule:
    """Export ``model(**inputs, return_dict=False)`` to a GraphModule (`torch.export`'s module).

    The GraphModule shares parameters and buffers with ``model`` (nothing is copied). The pipeline's
    first pass (`tcpass.passes.cleanup`) makes it a plain graph called positionally with the tensors
    of ``flatten_inputs(inputs)``, returning a tuple whose first item is the output.
    ``image_tokens`` (N) tells `find_blocks` which stream of a joint-attention block carries the
    image tokens. Inside `reusing_traces`, a trace of the same model and input signature is reused.
    """
    key = None
    if _traces is not None:
        flat = flatten_inputs(inputs)
        signature = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in flat.items())
        nones = tuple(k for k, v in inputs.items() if v is None)
        key = (id(model), image_tokens, nones, signature, constant_inputs(inputs))
        if key in _traces and _traces[key][0] is model:
            return copy_graph_module(_traces[key][1])
    with torch.no_grad():
        program = torch.export.export(model, (), {**inputs, "return_dict": False}, strict=False)
    gm = program.module()
    if image_tokens is not None:
        gm.meta[IMAGE_TOKENS] = image_tokens
    if key is not None:
        _traces[key] = (model, gm)
        return copy_graph_module(gm)
    return gm


def find_blocks(graph: fx.Graph, prefixes: tuple[str, ...]) -> list[BlockSpan]:
    """All transformer blocks of ``graph`` whose module path is ``<prefix>.<int>``, in graph order."""
    pattern = re.compile(rf"^(?:{'|'.join(re.escape(p) for p in prefixes)})\.\d+$")
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [path for path, _cls in stack.values() if pattern.match(path)]
        if node.op != "call_function" or not paths:
            continue
        path = paths[0]
        if runs and runs[-1][0] == path and runs[-1][1][-1].next is node:
            runs[-1][1].append(node)
        else:
            runs.append((path, [node]))
    seen: set[str] = set()
    spans = []
    for path, nodes in runs:
        if path in seen:
            raise UnsupportedModelError(
                f"block {path} appears in two separate places of the traced graph; token caching needs "
                "each block to be one contiguous computation."
            )
        seen.add(path)
        owner = graph.owning_module
        image_tokens = owner.meta.get(IMAGE_TOKENS) if owner is not None else None
        hidden_in, hidden_out, side = _residual_stream(path, nodes, image_tokens)
        spans.append(BlockSpan(len(spans), path, nodes, hidden_in, hidden_out, side))
    return spans


_ADDS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.alias.default)


def _added_to(node: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether ``node`` (through dtype casts) is an operand of an addition inside the block: a residual stream."""
    users = [u for u in node.users if u in inside]
    return any(u.target in _ADDS or (u.target in _CASTS and _added_to(u, inside)) for u in users)


def _residual_stream(path: str, nodes: list[fx.Node], image_tokens: int | None) -> tuple[fx.Node, fx.Node, tuple]:
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    image = outputs
    if len(outputs) > 1 and image_tokens is not None:
        image = [n for n in outputs if n.meta["val"].dim() == 3 and n.meta["val"].shape[1] == image_tokens]
    if len(image) != 1:
        raise UnsupportedModelError(
            f"block {path} produces {len(outputs)} values used after it ({[n.name for n in outputs]}) and "
            f"{len(image)} of them hold the {image_tokens} image tokens; tcpass needs exactly one "
            "image-token residual stream per block."
        )
    out = image[0]
    side = tuple(n for n in outputs if n is not out)
    shape = tuple(out.meta["val"].shape)
    external = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    candidates = [
        a
        for a in external
        if isinstance(a.meta.get("val"), torch.Tensor) and tuple(a.meta["val"].shape) == shape and a.op != "get_attr"
    ]
    if len(candidates) > 1:  # LTX-Video's rotary cos/sin are [batch, tokens, hidden] too: the stream is added to
        added = [a for a in candidates if _added_to(a, inside)]
        candidates = added if len(added) == 1 else candidates
    if len(candidates) != 1 or len(shape) != 3:
        raise UnsupportedModelError(
            f"block {path}: cannot identify the residual stream [batch, tokens, hidden] entering the "
            f"block (output shape {shape}, same-shaped inputs: {[a.name for a in candidates]})."
        )
    return candidates[0], out, side
