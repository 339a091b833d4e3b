"""An independent eager implementation of TokenCache semantics, for the golden tests.

It runs the original diffusers model and, through forward hooks, replaces each cached block's
output at CACHED steps with a computation written here from the block's own submodules
(``norm1``, ``attn1``, ``norm3``, ``ff``). Nothing from ``tcpass.passes`` is used, so the graphs
are checked against something they did not produce.
"""

from __future__ import annotations

import torch


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[b, idx[b]] for b in range(x.shape[0])])


def _put_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for b in range(x.shape[0]):
        out[b, idx[b]] = rows[b]
    return out


def dit_block_on_kept(block, x_kept, kv_source, timestep, class_labels):
    """BasicTransformerBlock (ada_norm_zero) for the kept tokens; keys/values from ``kv_source``.

    ``kv_source(normed_kept)`` returns the normalized hidden states keys and values are projected from.
    """
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(
        x_kept, timestep, class_labels, hidden_dtype=x_kept.dtype
    )
    h = x_kept + gate_msa.unsqueeze(1) * block.attn1(normed, encoder_hidden_states=kv_source(normed))
    normed = block.norm3(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return h + gate_mlp.unsqueeze(1) * block.ff(normed)


def attention_received(attn, normed):
    """ToCa score written from the diffusers Attention's own projections: mean attention per key token."""
    q, k = attn.to_q(normed), attn.to_k(normed)
    b, n, _ = q.shape
    q = q.view(b, n, attn.heads, -1).transpose(1, 2)
    k = k.view(b, n, attn.heads, -1).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return probs.mean(dim=(1, 2))


class ReferenceTokenCache:
    """Eager TokenCache over an unmodified DiT.

    ``select(block, x, state) -> [B, K] indices`` or ``None`` (whole-block reuse); ``state`` holds the
    block's ``input`` cache and, with ``toca=True``, its ``score`` cache.
    """

    def __init__(self, model, blocks, attention, select, toca=False):
        self.model, self.blocks, self.attention, self.select = model, blocks, attention, select
        self.toca = toca
        self.state: dict[int, dict] = {}
        self.full = True

    def __call__(self, inputs: dict, full: bool) -> torch.Tensor:
        self.full = full
        handles = [
            self.model.transformer_blocks[b].register_forward_hook(self._hook(b), with_kwargs=True) for b in self.blocks
        ]
        try:
            with torch.no_grad():
                return self.model(**inputs).sample
        finally:
            for h in handles:
                h.remove()

    def _hook(self, b):
        def hook(block, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            t, y = kwargs["timestep"], kwargs["class_labels"]
            normed_all = block.norm1(x, t, y, hidden_dtype=x.dtype)[0]
            if self.full:
                self.state[b] = {"delta": output - x, "kv_source": normed_all, "input": x.clone()}
                if self.toca:
                    self.state[b]["score"] = attention_received(block.attn1, normed_all)
                return output
            st = self.state[b]
            idx = self.select(b, x, st)
            if idx is None:
                return x + st["delta"]
            if self.toca:
                st["score"] = _put_rows(st["score"], idx, torch.zeros(idx.shape, dtype=st["score"].dtype))
            x_kept = _rows(x, idx)

            def kv(normed):
                if self.attention == "full_kv":
                    return normed_all
                if self.attention == "kept_only":
                    return normed
                # cached_kv: pruned rows keep what was projected when they were last computed
                st["kv_source"] = _put_rows(st["kv_source"], idx, normed)
                return st["kv_source"]

            y_kept = dit_block_on_kept(block, x_kept, kv, t, y)
            st["delta"] = _put_rows(st["delta"], idx, y_kept - x_kept)
            st["input"] = _put_rows(st["input"], idx, x_kept)
            return x + st["delta"]

        return hook


def topk_input_change(k):
    """The input_change selector, written independently: most-changed block inputs first."""
    return lambda b, x, state: ((x - state["input"]) ** 2).sum(-1).topk(k, dim=1).indices


class StreamReference:
    """Eager TokenCache for any supported family, written from block outputs and torch's SDPA.

    At a CACHED step each cached block runs on *all* tokens, with its self/joint attention changed
    the way the attention mode defines it (``full_kv``: unchanged; ``cached_kv``: keys/values of
    pruned image tokens are the ones cached when those tokens were last computed; ``kept_only``:
    pruned image tokens are masked out of the keys). Then the image stream keeps the fresh residual
    for kept tokens and the cached residual for the others; a text stream is taken as computed.
    Queries are row-wise, so the kept rows of this full computation are what computing only the
    kept rows gives. ``text_first``: joint attention puts text before image tokens (Flux);
    ``image_output``: the index of the image stream in a joint block's output (HunyuanVideo: 0).
    """

    def __init__(self, blocks, cached, attention, select, text_first=False, image_output=1):
        self.blocks, self.cached, self.attention, self.select = blocks, cached, attention, select
        self.text_first = text_first
        self.image_output = image_output  # where a joint block's output holds the image stream
        self.state: dict[int, dict] = {}
        self.full = True

    def __call__(self, model, inputs: dict, full: bool) -> torch.Tensor:
        self.full = full
        handles = []
        for b in self.cached:
            handles.append(self.blocks[b].register_forward_pre_hook(self._pre(b), with_kwargs=True))
            handles.append(self.blocks[b].register_forward_hook(self._post(b), with_kwargs=True))
        try:
            with torch.no_grad():
                return model(**inputs, return_dict=False)[0]
        finally:
            for h in handles:
                h.remove()
            torch.nn.functional.scaled_dot_product_attention = _SDPA

    def _pre(self, b):
        def hook(block, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            st = self.state.setdefault(b, {"kv": {}})
            idx = None if self.full else self.select(b, x, st)
            st["idx"], st["calls"] = idx, 0
            torch.nn.functional.scaled_dot_product_attention = self._sdpa(st, x.shape[1])

        return hook

    def _sdpa(self, st, n_image):
        def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
            q, k, v = query, key, value
            s = k.shape[-2]
            if q.shape[-2] != s:  # cross-attention to text: unchanged
                return _SDPA(q, k, v, attn_mask, *args, **kwargs)
            j = st["calls"]
            st["calls"] += 1
            if self.full:
                st["kv"][j] = (k.clone(), v.clone())
                return _SDPA(q, k, v, attn_mask, *args, **kwargs)
            off = s - n_image if self.text_first else 0
            fresh = torch.ones(k.shape[0], s, dtype=torch.bool)
            fresh[:, off : off + n_image] = False
            for row in range(k.shape[0]):
                fresh[row, off + st["idx"][row]] = True
            if self.attention == "cached_kv":
                keep = fresh[:, None, :, None]
                k = torch.where(keep, k, st["kv"][j][0])
                v = torch.where(keep, v, st["kv"][j][1])
                st["kv"][j] = (k, v)
            elif self.attention == "kept_only":
                assert attn_mask is None
                attn_mask = fresh[:, None, None, :]
            return _SDPA(q, k, v, attn_mask, *args, **kwargs)

        return sdpa

    def _post(self, b):
        def hook(block, args, kwargs, output):
            torch.nn.functional.scaled_dot_product_attention = _SDPA
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            image = output if isinstance(output, torch.Tensor) else output[self.image_output]
            st = self.state[b]
            if self.full:
                st["delta"], st["input"] = image - x, x.clone()
                return output
            idx = st["idx"]
            st["delta"] = _put_rows(st["delta"], idx, _rows(image - x, idx))
            st["input"] = _put_rows(st["input"], idx, _rows(x, idx))
            image = x + st["delta"]
            if isinstance(output, torch.Tensor):
                return image
            return tuple(image if i == self.image_output else o for i, o in enumerate(output))

        return hook


_SDPA = torch.nn.functional.scaled_dot_product_attention


def dynamic_predictor_reference(model, predictor, blocks, attention, k):
    """The dynamic Cache Predictor's semantics on an eager model, for ``run(step_inputs, full)`` per step.

    The predictor is applied eagerly to block 0's input (captured by a hook) once per step, before any
    block; block ``b`` keeps the top-``k`` of ``scores[..., b]``; the first cached block's kept tokens
    refresh the reference input ``x0_ref``, which the FULL step sets to block 0's input.
    """
    seen = {}
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x0=args[0] if args else kwargs["hidden_states"], t=kwargs["timestep"]),
        with_kwargs=True,
    )

    def select(b, x, _state):
        with torch.no_grad():
            if b == blocks[0]:  # one predictor call per step, before any block refreshes x0_ref
                seen["scores"] = predictor(seen["x0"], seen["t"], seen["x0_ref"])
            idx = seen["scores"][..., b].topk(k, dim=1).indices
            if b == blocks[0]:  # the first cached block's kept tokens refresh the reference
                for row in range(idx.shape[0]):
                    seen["x0_ref"][row, idx[row]] = seen["x0"][row, idx[row]]
            return idx

    ref = ReferenceTokenCache(model, blocks, attention, select)

    def run(step_inputs: dict, full: bool) -> torch.Tensor:
        out = ref(step_inputs, full=full)
        if full:
            seen["x0_ref"] = seen["x0"].clone()  # block 0's input at the FULL step
        return out

    return run
