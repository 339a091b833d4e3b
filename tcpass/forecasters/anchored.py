"""``anchored``: each pruned token's last residual, moved along the block's trend over its FULL steps.

Per cached block the caches hold the residuals of every token at the last ``order + 1`` FULL steps
(``block{b}.full``, ``block{b}.full.1``, ...; newest first) and their timesteps (``block{b}.full_stamp``,
...; [B, N], float32), and, per token, the timestep at which it was last computed
(``block{b}.stamp``: a FULL step, or a CACHED step where it was kept; its residual then is
``block{b}.delta``). With ``P`` Newton's polynomial through the FULL steps' residuals, a token last
computed at ``s`` with residual ``d`` is forecast at timestep ``t`` as::

    f(t) = d + P(t) - P(s)

the polynomial shifted to pass through the token's own last value. A token not recomputed since the
last FULL step gets ``P(t)`` (TaylorSeer's forecast, Liu et al. 2025, in the timestep); a kept token
starts from its fresh value and follows the trend the FULL steps measured, whose steps are the
plan's FULL interval apart (differencing residuals one CACHED step apart amplifies their noise: that
is `tcpass.forecasters.taylor`). An entry is valid when older (a larger timestep); with fewer valid
FULL steps the polynomial's order drops (order 0: reuse).
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
class Anchored(TokenForecaster):
    """The FULL steps' Newton polynomial of order ``spec.order``, shifted through each token's last value."""

    kind = "anchored"

    def __init__(self, spec: ForecastSpec) -> None:
        super().__init__(spec)
        self.order = spec.order
        self._shapes: dict[int, tuple[int, ...]] = {}  # block -> its residual's [B, N, D]
        self._dtypes: dict[int, object] = {}  # block -> its residual's dtype

    @classmethod
    def check(cls, spec: ForecastSpec) -> None:
        if spec.order not in ORDERS:
            raise ValueError(f"forecast.order = {spec.order!r}: the anchored forecast has orders {ORDERS}.")

    def _names(self, block: int, kind: str) -> list[str]:
        return [_older(block_cache(block, kind), k) for k in range(self.order + 1)]

    def block_caches(self, delta: TensorSpec) -> list[TensorSpec]:
        import torch

        b, (batch, tokens, _) = delta.block, delta.shape
        self._shapes[b], self._dtypes[b] = delta.shape, delta.dtype
        full = [dataclasses.replace(delta, name=n, kind="full") for n in self._names(b, "full")]
        stamps = [TensorSpec(n, b, "stamp", (batch, tokens), torch.float32) for n in self._names(b, "full_stamp")]
        return [*full, *stamps, TensorSpec(block_cache(b, "stamp"), b, "stamp", (batch, tokens), torch.float32)]

    def carried(self, block: int) -> tuple[str, ...]:
        return (*self._names(block, "full")[:-1], *self._names(block, "full_stamp")[:-1])

    def _now(self, em: Emitter, block: int, timestep: fx.Node | None, tokens: int | None = None) -> fx.Node:
        """The current timestep as float32 [B, tokens] (default: the block's N)."""
        import torch

        if timestep is None:
            raise ValueError("forecast.kind = 'anchored' needs the model's timestep input in the graph.")
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
        now = self._now(em, block, timestep)
        values = {
            self._names(block, "full")[0]: em(aten.clone.default, (fresh,)),
            self._names(block, "full_stamp")[0]: em(aten.clone.default, (now,)),
            block_cache(block, "stamp"): em(aten.clone.default, (now,)),
        }
        for kind in ("full", "full_stamp"):
            names = self._names(block, kind)
            for k in range(1, self.order + 1):  # every entry one place older (buffer to buffer, `writeback`)
                values[names[k]] = em(aten.clone.default, (old[names[k - 1]],))
        return values

    def predict(self, em: Emitter, block: int, caches: dict[str, fx.Node], timestep: fx.Node) -> fx.Node:
        import torch

        aten = torch.ops.aten
        f = [caches[n] for n in self._names(block, "full")]
        s = [caches[n] for n in self._names(block, "full_stamp")]
        last = caches[block_cache(block, "stamp")]
        t = self._now(em, block, timestep)

        def sub(a, b):
            return em(aten.sub.Tensor, (a, b))

        def mul(a, b):
            return em(aten.mul.Tensor, (a, b))

        def div(a, b):
            return em(aten.div.Tensor, (a, b))

        def gap(newer: fx.Node, older: fx.Node, valid: fx.Node) -> fx.Node:
            return em(aten.where.ScalarOther, (valid, sub(newer, older), 1.0))  # a safe denominator

        def mask(valid: fx.Node) -> fx.Node:
            return em(aten._to_copy.default, (valid,), {"dtype": torch.float32})

        # P(t) - P(last) = (t - last) [f0, f1] + ((t - s0)(t - s1) - (last - s0)(last - s1)) [f0, f1, f2]
        valid1 = em(aten.gt.Tensor, (s[1], s[0]))
        gap01 = gap(s[0], s[1], valid1)
        g1 = mul(div(sub(t, last), gap01), mask(valid1))  # coefficient of f0 - f1
        terms = [(g1, sub(f[0], f[1]))]
        if self.order == 2:
            valid2 = em(aten.logical_and.default, (valid1, em(aten.gt.Tensor, (s[2], s[1]))))
            gap12, gap02 = gap(s[1], s[2], valid2), gap(s[0], s[2], valid2)
            span = sub(mul(sub(t, s[0]), sub(t, s[1])), mul(sub(last, s[0]), sub(last, s[1])))
            c = mul(div(span, gap02), mask(valid2))
            terms[0] = (em(aten.add.Tensor, (g1, div(c, gap01))), terms[0][1])
            terms.append((em(aten.neg.default, (div(c, gap12),)), sub(f[1], f[2])))  # coefficient of f1 - f2
        out = caches[block_cache(block, "delta")]
        for g, difference in terms:
            g = em(aten.unsqueeze.default, (em(aten._to_copy.default, (g,), {"dtype": self._dtypes[block]}), -1))
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
        stamp = block_cache(block, "stamp")
        now = self._now(em, block, timestep, k)
        updated[stamp] = em.scatter(caches[stamp], 1, idx, now, list(self._shapes[block][:2]), k)
