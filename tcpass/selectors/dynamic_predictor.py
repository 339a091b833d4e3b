"""``dynamic``: the dynamic Cache Predictor, a small network run inside the CACHED graph.

It runs once per CACHED step as a submodule call (``tc_predictor``) on the tokens entering block 0,
the timestep and block 0's input when each token was last recomputed (cache ``predictor.input``
[B, N, D], filled at FULL steps and, at CACHED steps, refreshed for the tokens the first cached block
keeps): ``scores = tc_predictor(x0, t, x0_ref)`` [B, N, L]; block ``b`` keeps the top-K of
``scores[..., b]``. Its weights are ``selector.path`` (safetensors, `tcpass.predictor`), guarded by
``selector.sha256``; the graphs run it in the model's dtype.
"""

from __future__ import annotations

from tcpass.contracts import TensorSpec
from tcpass.selectors.base import TokenSelector, register_selector

PREDICTOR_INPUT = "predictor.input"
PREDICTOR_MODULE = "tc_predictor"


@register_selector
class DynamicSelector(TokenSelector):
    kind = "dynamic"
    file_role = "predictor weights"

    def module(self, hidden_size, num_blocks):
        from tcpass.predictor import load_predictor

        return load_predictor(self.path, self.spec.sha256, hidden_size=hidden_size, num_blocks=num_blocks)

    def graph_caches(self, spans):
        v = spans[0].hidden_in.meta["val"]
        return [TensorSpec(PREDICTOR_INPUT, -1, "input", tuple(v.shape), v.dtype)]

    def graph_full_values(self, spans):
        return {PREDICTOR_INPUT: spans[0].hidden_in}

    def begin_cached(self, gm, spans, caches, updated, ctx):
        x0_ref = caches[PREDICTOR_INPUT]
        updated[PREDICTOR_INPUT] = x0_ref  # unchanged unless a block keeps tokens (after_keep)
        if any(ctx["keep"].values()):
            ctx["x0"] = spans[0].hidden_in
            ctx["scores"] = _emit_predictor(gm, ctx["x0"], ctx.get("module"), ctx.get("timestep_input"), x0_ref)

    def kept_score(self, em, span, x_in, caches, ctx):
        import torch

        return em(torch.ops.aten.select.int, (ctx["scores"], 2, span.index))

    def after_keep(self, em, span, idx, x_kept, caches, updated, ctx):
        if ctx.get("refreshed"):
            return
        ctx["refreshed"] = True  # the first block that keeps tokens refreshes the reference: x0 of those tokens
        x0, k = ctx["x0"], ctx["keep"][span.index]
        shape = list(x0.meta["val"].shape)
        rows = em.gather(x0, 1, idx, shape, k)
        updated[PREDICTOR_INPUT] = em.scatter(caches[PREDICTOR_INPUT], 1, idx, rows, shape, k)


def _emit_predictor(gm, x0, predictor, timestep, x0_ref):
    """Call the dynamic Cache Predictor once, right after the tokens entering block 0 exist."""
    if predictor is None or timestep is None:
        raise ValueError("selector 'dynamic' needs the predictor module and the timestep input name.")
    t = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == timestep), None)
    if t is None:
        raise ValueError(f"the traced graph has no input named {timestep!r} for the dynamic predictor.")
    gm.add_submodule(PREDICTOR_MODULE, predictor)
    with gm.graph.inserting_after(x0):
        node = gm.graph.call_module(PREDICTOR_MODULE, (x0, t, x0_ref))
    node.meta.update({k: v for k, v in x0.meta.items() if k == "stack_trace"})
    return node
