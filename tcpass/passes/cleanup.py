"""Turn an exported module into a plain positional GraphModule.

Before (``ExportedProgram.module()``)::

    def forward(self, hidden_states, timestep, class_labels, return_dict):   # pytree codegen
        _guards_fn = self._guards_fn(hidden_states, timestep, class_labels, return_dict)
        ...
        _assert_tensor_metadata(add, dtype=torch.float32, device=cpu)
        dropout = torch.ops.aten.dropout.default(linear_6, 0.0, False)
        ...
        return pytree.tree_unflatten((reshape_3,), out_spec)

After::

    def forward(self, hidden_states, timestep, class_labels):
        ...
        return (reshape_3,)

Inert dropouts (p=0 or eval mode) are removed too: ATen marks dropout impure, which would keep the
original computation of every rewritten block alive through dead-code elimination. So are squeezes of
a dimension that is not 1 (PixArt's ``hidden_states.squeeze(1)`` on 16 tokens): a no-op in torch, but
the ONNX exporter writes them as ``Squeeze``, which ONNX defines only for dimensions of size 1.
The guards and metadata assertions check the trace-time input signature; the runtime keys its
graphs on that signature instead. They are side-effecting nodes, so keeping them would also keep
the computation of every rewritten block alive through dead-code elimination.
"""

from __future__ import annotations

import torch
from torch import fx

_ASSERTS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


_SQUEEZES = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)


def _is_identity(node: fx.Node) -> bool:
    """An inert dropout (p=0 or eval: impure for dead-code elimination), or a squeeze of no dimension of size 1."""
    if node.target is torch.ops.aten.dropout.default:
        return node.args[1] == 0 or not node.args[2]
    if node.target in _SQUEEZES:
        shape = node.args[0].meta["val"].shape
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        return all(shape[d] != 1 for d in dims)
    return False


def strip_export_artifacts(gm: fx.GraphModule, input_names: list[str]) -> fx.GraphModule:
    """In place: plain codegen, no guards/asserts, placeholders exactly ``input_names``."""
    graph = gm.graph
    graph._codegen = fx.graph.CodeGen()
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or (
            node.op == "call_function" and node.target in _ASSERTS
        ):
            graph.erase_node(node)
    for node in list(graph.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if node.target not in input_names:
            if node.users:
                raise ValueError(f"exported graph input {node.target!r} is used but is not a tensor input")
            graph.erase_node(node)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    if names != list(input_names):
        raise ValueError(f"exported graph inputs {names} differ from the expected {list(input_names)}")
    graph.lint()
    gm.recompile()
    return gm
