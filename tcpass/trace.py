"""Trace a model to an ATen-level FX graph and find its transformer blocks from node metadata.

`torch.export.export(strict=False)` records, on every node, the stack of modules that produced it
(``meta["nn_module_stack"]``). A transformer block is the contiguous run of nodes whose stack holds
the block module itself (``transformer_blocks.3``); no model-specific code is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx, nn

from tcpass.passes.cleanup import strip_export_artifacts


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

    @property
    def num_tokens(self) -> int:
        return int(self.hidden_in.meta["val"].shape[1])


def export_graph(model: nn.Module, inputs: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Export ``model(**inputs, return_dict=False)`` to a plain GraphModule taking ``inputs`` in order.

    The GraphModule shares parameters and buffers with ``model`` (nothing is copied) and is called
    positionally with the tensors of ``inputs``; it returns a tuple whose first item is the output.
    """
    with torch.no_grad():
        program = torch.export.export(model, (), {**inputs, "return_dict": False}, strict=False)
    gm = program.module()
    strip_export_artifacts(gm, list(inputs))
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
        hidden_in, hidden_out = _residual_stream(path, nodes)
        spans.append(BlockSpan(len(spans), path, nodes, hidden_in, hidden_out))
    return spans


def _residual_stream(path: str, nodes: list[fx.Node]) -> tuple[fx.Node, fx.Node]:
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        raise UnsupportedModelError(
            f"block {path} produces {len(outputs)} values used after it ({[n.name for n in outputs]}); "
            "tcpass supports blocks with one residual-stream output for this model family."
        )
    out = outputs[0]
    shape = tuple(out.meta["val"].shape)
    external = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    candidates = [
        a
        for a in external
        if isinstance(a.meta.get("val"), torch.Tensor) and tuple(a.meta["val"].shape) == shape and a.op != "get_attr"
    ]
    if len(candidates) != 1 or len(shape) != 3:
        raise UnsupportedModelError(
            f"block {path}: cannot identify the residual stream [batch, tokens, hidden] entering the "
            f"block (output shape {shape}, same-shaped inputs: {[a.name for a in candidates]})."
        )
    return candidates[0], out
