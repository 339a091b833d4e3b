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
                st["score"] = _put_rows(st["score"], idx, torch.zeros(idx.shape))
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
