"""SKIP-step passes: the block stack's residual as a cache, and a graph that runs without the blocks.

``add_stack_residual`` runs first, on the traced graph, so the FULL and CACHED passes that follow
both return the residual as the first cache (cache ``stack.residual``). Before::

    x0 = pos_embed(hidden_states)                   # enters block 0 [B, N, D]
    y = <blocks 0..L-1>(x0)                         # leaves the last block
    sample = unpatchify(proj_out(norm_out(y), emb))
    return (sample,)

After (``level="stack"``)::

    ...
    y = <blocks 0..L-1>(x0)
    residual = y - x0                               # stack.residual
    sample = unpatchify(proj_out(norm_out(y), emb))
    return (sample, residual)

With ``level="output"`` the residual is the model output itself (``return (sample, sample)``).

``emit_skip_step`` builds the SKIP graph from the same traced graph, with inputs after the model
inputs: the cached residual and a scale [1]::

    x0 = pos_embed(hidden_states)
    y = x0 + scale * stack_residual                 # no block runs (dead code removed)
    sample = unpatchify(proj_out(norm_out(y), emb))
    return (sample,)

or, ``level="output"``, ``return (scale * stack_residual,)``: nothing of the model runs. A forecast
over ``history`` H > 1 computed steps reads H residuals, newest first, and H weights::

    y = x0 + w[0] * stack_residual + w[1] * stack_residual_1 + ... + w[H-1] * stack_residual_{H-1}

(the older residuals are kept by the executors, `tcpass.contracts.history_moves`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from tcpass.contracts import STACK_RESIDUAL, TensorSpec, residual_history
from tcpass.passes.layout import add_placeholders, append_outputs, mutates
from tcpass.trace import copy_graph_module, find_blocks

aten = torch.ops.aten

RESIDUAL = STACK_RESIDUAL
SCALE = "skip.scale"


def _stack_ends(gm: fx.GraphModule, block_prefixes: tuple[str, ...]) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    spans = find_blocks(gm.graph, block_prefixes)
    if not spans:
        raise ValueError(f"no transformer blocks found under {block_prefixes}: nothing to skip.")
    return spans[0].hidden_in, spans[-1].hidden_out, [n for s in spans for n in s.nodes]


def add_stack_residual(
    gm: fx.GraphModule, block_prefixes: tuple[str, ...], level: str
) -> tuple[fx.GraphModule, TensorSpec]:
    """A copy of ``gm`` that also returns the stack residual (``level`` ``stack``) or its output (``output``)."""
    gm = copy_graph_module(gm)
    graph = gm.graph
    if level == "stack":
        stack_in, stack_out, block_nodes = _stack_ends(gm, block_prefixes)
        with graph.inserting_after(block_nodes[-1]):
            residual = graph.call_function(aten.sub.Tensor, (stack_out, stack_in))
        # no nn_module_stack: the node belongs to no block, so later passes keep the blocks contiguous
        val = stack_out.meta["val"]
        residual.meta["val"] = val  # same shape and dtype; `finalize` re-propagates exact values
    else:
        residual = graph.output_node().args[0][0]
        val = residual.meta["val"]
    append_outputs(graph, [residual])
    graph.lint()
    gm.recompile()
    return gm, TensorSpec(RESIDUAL, -1, "residual", tuple(val.shape), val.dtype)


def emit_skip_step(
    gm: fx.GraphModule, block_prefixes: tuple[str, ...], level: str, residual: TensorSpec, history: int = 1
) -> tuple[fx.GraphModule, list[TensorSpec], TensorSpec]:
    """The SKIP graph of ``gm`` (the traced model): ``(*model_inputs, *residuals, weights) -> (sample,)``.

    Returns it with the residual inputs it reads (``history`` of them, newest first) and the weights spec.
    """
    gm = copy_graph_module(gm)
    graph = gm.graph
    residuals = [dataclasses.replace(residual, name=n) for n in residual_history(history)]
    scale_spec = TensorSpec(SCALE, -1, "scale", (history,), residual.dtype)
    inputs = add_placeholders(graph, [*residuals, scale_spec])
    output = graph.output_node()
    anchor = output
    if level == "stack":
        stack_in, stack_out, block_nodes = _stack_ends(gm, block_prefixes)
        anchor = block_nodes[-1].next
    with graph.inserting_before(anchor):
        weights = inputs[SCALE]
        if history == 1:
            predicted = graph.call_function(aten.mul.Tensor, (inputs[RESIDUAL], weights))
            if level == "stack":
                predicted = graph.call_function(aten.add.Tensor, (stack_in, predicted))
        else:  # one pass per residual: acc + r_k * w[k] (addcmul), starting from the embedded input
            predicted = stack_in if level == "stack" else None
            for k, spec in enumerate(residuals):
                w = graph.call_function(aten.select.int, (weights, 0, k))
                if predicted is None:
                    predicted = graph.call_function(aten.mul.Tensor, (inputs[spec.name], w))
                else:
                    predicted = graph.call_function(aten.addcmul.default, (predicted, inputs[spec.name], w))
    if level == "stack":
        inside = set(block_nodes)
        stack_out.replace_all_uses_with(predicted, delete_user_cb=lambda user: user not in inside)
    else:
        outputs = list(output.args[0])
        outputs[0] = predicted
        output.args = (tuple(outputs),)
    graph.eliminate_dead_code(is_impure_node=mutates)
    if level == "stack":
        left = [n.name for n in graph.nodes if n in set(block_nodes)]
        if left:
            raise ValueError(
                f"skip.level='stack': the output still depends on values computed inside the blocks "
                f"({left[:3]}...), so the stack cannot be skipped for this model; use skip.level='output'."
            )
    graph.lint()
    gm.recompile()
    return gm, residuals, scale_spec
