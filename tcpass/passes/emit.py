"""Node builders shared by the passes: per-row token gather/scatter with a fixed K.

Indices are ``[B, K]`` int64 (each batch row its own tokens). They are broadcast to the tensor's
layout with view + expand, so gather/scatter work on any token axis, keep static shapes, compile to
one graph, and export to ONNX GatherElements/ScatterElements.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

aten = torch.ops.aten

SIGNATURE = "tcpass_val_from"
"""``node.meta`` key: what its ``val`` was computed from (`tcpass.passes.layout.stamp`); never copied."""


class Emitter:
    """Appends call_function nodes one after another, starting after ``after``."""

    def __init__(self, graph: fx.Graph, after: fx.Node, meta_from: fx.Node) -> None:
        self.graph = graph
        self.cursor = after
        self.meta = {k: v for k, v in meta_from.meta.items() if k in ("nn_module_stack", "stack_trace")}

    def __call__(self, target, args, kwargs=None, meta_from: fx.Node | None = None) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.call_function(target, tuple(args), dict(kwargs or {}))
        source = meta_from.meta if meta_from is not None else self.meta
        node.meta.update({k: copy.copy(v) for k, v in source.items() if k not in ("val", SIGNATURE)})
        self.cursor = node
        return node

    def index_like(self, indices: fx.Node, shape: list[int], axis: int) -> fx.Node:
        """``indices`` [B, K] broadcast to ``shape`` (which has K at ``axis``)."""
        view_shape = [1] * len(shape)
        view_shape[0], view_shape[axis] = shape[0], shape[axis]
        viewed = self(aten.view.default, (indices, view_shape))
        return self(aten.expand.default, (viewed, list(shape)))

    def gather(self, src: fx.Node, axis: int, indices: fx.Node, full_shape: list[int], k: int) -> fx.Node:
        """Rows ``indices`` of ``src`` ([.., N, ..], shape ``full_shape``) along ``axis``: [.., K, ..]."""
        shape = list(full_shape)
        shape[axis] = k
        return self(aten.gather.default, (src, axis, self.index_like(indices, shape, axis)))

    def scatter(
        self, dst: fx.Node, axis: int, indices: fx.Node, src: fx.Node, full_shape: list[int], k: int
    ) -> fx.Node:
        """Copy of ``dst`` (shape ``full_shape``) with rows ``indices`` along ``axis`` replaced by ``src``."""
        shape = list(full_shape)
        shape[axis] = k
        return self(aten.scatter.src, (dst, axis, self.index_like(indices, shape, axis), src))
