"""``taylor``: each pruned token's residual extrapolated from its own history, in the timestep.

Per cached block the caches hold, for every token, its residuals at the last ``order + 1`` steps at
which it was computed (``block{b}.delta``, ``block{b}.delta.1``, ...; newest first) and those steps'
timesteps (``block{b}.stamp``, ``block{b}.stamp.1``, ...; [B, N], float32). FULL steps compute every
token and CACHED steps their K kept tokens: those enter the history, each older entry moving one
place back. A token's forecast at timestep ``t`` is Newton's interpolating polynomial through its
history, evaluated at ``t`` (order 1, with ``f_k`` at ``s_k``)::

    f(t) = f_0 + (t - s_0) * (f_0 - f_1) / (s_0 - s_1)

and order 2 adds ``(t - s_0) (t - s_1) [f_0, f_1, f_2]`` (the second divided difference). Within a
generation timesteps go down, so an entry is valid when it is older, ``s_k > s_{k-1}``; a token
without enough history (the first CACHED steps, a zeroed cache) falls back to the orders it has
(order 0: reuse). Each token's coefficients are [B, N] float32 numbers computed in the graph and cast to
the residuals' dtype; shapes stay static and nothing is decided on the host.

This is TaylorSeer's forecast (Liu et al., 2025) made per token: TaylorSeer differences whole
features over the steps they were all computed at; here each token has its own steps.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tcpass.contracts import TensorSpec, block_cache
from tcpass.forecasters.base import TokenForecaster, register_forecaster

if TYPE_CHECKING:
    from torch import fx

    from tcpass.passes.emit import Emitter
    from tcpass.plan import ForecastSpec

ORDERS = (1, 2)


def _older(name: str, k: int) -> str:
    return name if k == 0 else f"{name}.{k}"


@register_forecaster
class Taylor(TokenForecaster):
    """Per-token Newton extrapolation of order ``spec.order`` in the timestep (module docstring)."""

    kind = "taylor"

    def __init__(self, spec: ForecastSpec) -> None:
        super().__init__(spec)
        self.order = spec.order
        self._shapes: dict[int, tuple[int, ...]] = {}  # block -> its residual's [B, N, D]
        self._dtypes: dict[int, object] = {}  # block -> its residual's dtype

    @classmethod
    def check(cls, spec: ForecastSpec) -> None:
        if spec.order not in ORDERS:
            raise ValueError(f"forecast.order = {spec.order!r}: the taylor forecast has orders {ORDERS}.")

    def _names(self, block: int, kind: str) -> list[str]:
        """``kind`` (delta or stamp) of ``block``, newest first: order + 1 names."""
        return [_older(block_cache(block, kind), k) for k in range(self.order + 1)]

    def block_caches(self, delta: TensorSpec) -> list[TensorSpec]:
        import torch

        b, (batch, tokens, _) = delta.block, delta.shape
        self._shapes[b], self._dtypes[b] = delta.shape, delta.dtype
        older = [dataclasses.replace(delta, name=n) for n in self._names(b, "delta")[1:]]
        stamps = [TensorSpec(n, b, "stamp", (batch, tokens), torch.float32) for n in self._names(b, "stamp")]
        return older + stamps

    def carried(self, block: int) -> tuple[str, ...]:
        return (*self._names(block, "delta")[:-1], *self._names(block, "stamp")[:-1])

    def _now(self, em: Emitter, block: int, timestep: fx.Node | None, tokens: int | None = None) -> fx.Node:
        """The current timestep as float32 [B, tokens] (default: the block's N)."""
        import torch

        if timestep is None:
            raise ValueError("forecast.kind = 'taylor' needs the model's timestep input in the graph.")
        aten = torch.ops.aten
        batch, n = self._shapes[block][:2]
        t = em(aten._to_copy.default, (timestep,), {"dtype": torch.float32})
        t = em(aten.reshape.default, (t, [-1, 1]))
        return em(aten.expand.default, (t, [batch, n if tokens is None else tokens]))

    def full_values(
        self, em: Emitter, block: int, fresh: fx.Node, old: dict[str, fx.Node], timestep: fx.Node
    ) -> dict[str, fx.Node]:
        import torch

        aten = torch.ops.aten
        values = {self._names(block, "stamp")[0]: em(aten.clone.default, (self._now(em, block, timestep),))}
        for kind in ("delta", "stamp"):
            names = self._names(block, kind)
            for k in range(1, self.order + 1):  # every entry one place older (a copy: the old buffer is rewritten)
                values[names[k]] = em(aten.clone.default, (old[names[k - 1]],))
        return values

    def predict(self, em: Emitter, block: int, caches: dict[str, fx.Node], timestep: fx.Node) -> fx.Node:
        import torch

        aten = torch.ops.aten
        f = [caches[n] for n in self._names(block, "delta")]
        s = [caches[n] for n in self._names(block, "stamp")]
        t = self._now(em, block, timestep)
        dtype = self._dtypes[block]

        def gap(newer: fx.Node, older: fx.Node, valid: fx.Node) -> fx.Node:
            """``newer - older`` where ``valid``, else 1 (a safe denominator)."""
            return em(aten.where.ScalarOther, (valid, em(aten.sub.Tensor, (newer, older)), 1.0))

        def mask(valid: fx.Node) -> fx.Node:
            return em(aten._to_copy.default, (valid,), {"dtype": torch.float32})

        since = em(aten.sub.Tensor, (t, s[0]))  # t - s_0
        valid1 = em(aten.gt.Tensor, (s[1], s[0]))  # an entry is valid when older: a larger timestep
        gap01 = gap(s[0], s[1], valid1)
        g1 = em(aten.mul.Tensor, (em(aten.div.Tensor, (since, gap01)), mask(valid1)))  # coefficient of f_0 - f_1
        terms = [(g1, em(aten.sub.Tensor, (f[0], f[1])))]
        if self.order == 2:
            valid2 = em(aten.logical_and.default, (valid1, em(aten.gt.Tensor, (s[2], s[1]))))
            gap12, gap02 = gap(s[1], s[2], valid2), gap(s[0], s[2], valid2)
            since1 = em(aten.sub.Tensor, (t, s[1]))
            c = em(aten.div.Tensor, (em(aten.mul.Tensor, (since, since1)), gap02))
            c = em(aten.mul.Tensor, (c, mask(valid2)))  # (t - s_0)(t - s_1) / (s_0 - s_2)
            terms[0] = (em(aten.add.Tensor, (g1, em(aten.div.Tensor, (c, gap01)))), terms[0][1])
            g2 = em(aten.neg.default, (em(aten.div.Tensor, (c, gap12)),))  # coefficient of f_1 - f_2
            terms.append((g2, em(aten.sub.Tensor, (f[1], f[2]))))
        out = f[0]
        for g, difference in terms:
            g = em(aten.unsqueeze.default, (em(aten._to_copy.default, (g,), {"dtype": dtype}), -1))
            out = em(aten.addcmul.default, (out, g, difference))
        return out

    def after_keep(
        self,
        em: Emitter,
        block: int,
        idx: fx.Node,
        k: int,
        fresh_kept: fx.Node,
        caches: dict[str, fx.Node],
        updated: dict[str, fx.Node],
        timestep: fx.Node,
    ) -> None:
        shape = list(self._shapes[block])
        for kind, full in (("delta", shape), ("stamp", shape[:2])):
            names = self._names(block, kind)
            for j in range(self.order, 0, -1):  # oldest first: each reads the next newer entry before it moves
                rows = em.gather(caches[names[j - 1]], 1, idx, full, k)
                updated[names[j]] = em.scatter(caches[names[j]], 1, idx, rows, full, k)
        now = self._now(em, block, timestep, k)
        stamp = self._names(block, "stamp")[0]
        updated[stamp] = em.scatter(caches[stamp], 1, idx, now, shape[:2], k)
