"""`TokenForecaster`: what a token not recomputed at a CACHED step gets, and the history it keeps.

A cached block's caches hold ``block{b}.delta`` [B, N, D], each token's residual when it was last
computed. At a CACHED step the block's K kept tokens are computed fresh; a forecaster gives the
residual of every token (`predict`), and the kept tokens' fresh residuals replace theirs. A block
with K = 0 is not run: all its tokens take the forecast (block-level forecasting).

A forecaster owns, in one class:

- ``check(spec)``: what its `tcpass.plan.ForecastSpec` fields must hold.
- Caches: ``block_caches`` (per cached block, after the token selector's) and ``carried``, the names of
  the block's caches the FULL graph reads as inputs (their values before the call) to shift a
  history: a FULL graph then takes those caches as inputs after the model inputs.
- FULL graph: ``full_values``, the nodes its caches are filled from.
- CACHED graph: ``predict`` (every token's residual, read before any cache is updated),
  ``after_keep`` (its caches' updates for the kept tokens) and ``refine`` (the pruned tokens' residuals once
  the kept ones are computed: cluster propagation, `tcpass.forecasters.propagation`).

Every graph hook gets ``timestep``, the model's timestep input node: histories are stamped in the
model's own timestep units (an extrapolation is the same in any affine rescaling of them).

Executors zero every cache when a generation starts (`tcpass.controller.Decision.fresh`), so a
history never reaches across generations; a cached timestamp is then 0, never above a timestep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from tcpass.contracts import TensorSpec, block_cache, register_into

if TYPE_CHECKING:
    from torch import fx

    from tcpass.passes.emit import Emitter
    from tcpass.plan import ForecastSpec

FORECASTERS: dict[str, type[TokenForecaster]] = {}


register_forecaster = register_into(FORECASTERS, "forecaster")
"""Class decorator: registers a class under its ``kind`` (a kind registered twice is an error)."""


class TokenForecaster:
    """Base forecaster: the hooks and their defaults (no caches of its own). See the module docstring."""

    kind: ClassVar[str]

    def __init__(self, spec: ForecastSpec | None) -> None:
        self.spec = spec

    @classmethod
    def check(cls, spec: ForecastSpec) -> None:
        """Raise ``ValueError`` naming the field if ``spec`` does not configure this forecaster."""

    def block_caches(self, delta: TensorSpec) -> list[TensorSpec]:
        """Caches added to the block whose residual cache is ``delta`` ([B, N, D])."""
        return []

    def carried(self, block: int) -> tuple[str, ...]:
        """Names of block ``block``'s caches the FULL graph reads (a history it shifts); none by default."""
        return ()

    def full_values(
        self, em: Emitter, block: int, fresh: fx.Node, old: dict[str, fx.Node], timestep: fx.Node
    ) -> dict[str, fx.Node]:
        """FULL graph: the node each of this forecaster's caches is filled from. ``fresh``: the block's
        new residual [B, N, D]; ``old``: the carried caches' input nodes, by name."""
        return {}

    def predict(self, em: Emitter, block: int, caches: dict[str, fx.Node], timestep: fx.Node) -> fx.Node:
        """CACHED graph: the residual [B, N, D] of every token of ``block`` (``caches``: name -> input node)."""
        raise NotImplementedError

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
        """CACHED graph, after block ``block`` computed ``fresh_kept`` [B, K, D] for tokens ``idx`` [B, K]:
        write this forecaster's cache updates into ``updated`` (a cache left out keeps its value)."""

    def refine(
        self,
        em: Emitter,
        block: int,
        forecast: fx.Node,
        cached: fx.Node,
        idx: fx.Node,
        k: int,
        fresh_kept: fx.Node,
        shape: list[int],
    ) -> fx.Node:
        """CACHED graph, once block ``block`` computed ``fresh_kept`` [B, K, D] for tokens ``idx``: every token's
        residual before the kept rows are written (``forecast``; with ``spec.propagate`` > 0, cluster
        propagation, `tcpass.forecasters.propagation`). ``cached``: the block's ``delta`` cache before this step."""
        weight = 0.0 if self.spec is None else self.spec.propagate
        if weight == 0 or k == 0:
            return forecast
        from tcpass.forecasters.propagation import propagate

        return propagate(em, forecast, cached, idx, fresh_kept, shape, k, weight)


@register_forecaster
class Reuse(TokenForecaster):
    """A pruned token reuses the residual cached when it was last computed (``x + delta``): no history."""

    kind = "reuse"

    def predict(self, em: Emitter, block: int, caches: dict[str, fx.Node], timestep: fx.Node) -> fx.Node:
        return caches[block_cache(block, "delta")]


class HistoryForecaster(TokenForecaster):
    """Base of the forecasters that keep a history of order ``spec.order`` per cached block: the order
    check, the history's cache names (newest first: ``block3.delta``, ``block3.delta.1``, ...), the
    block's residual shape and dtype, and the graph nodes their Newton forms share."""

    orders: ClassVar[tuple[int, ...]] = (1, 2)

    def __init__(self, spec: ForecastSpec) -> None:
        super().__init__(spec)
        self.order = spec.order
        self._shapes: dict[int, tuple[int, ...]] = {}  # block -> its residual's [B, N, D]
        self._dtypes: dict[int, object] = {}  # block -> its residual's dtype

    @classmethod
    def check(cls, spec: ForecastSpec) -> None:
        if spec.order not in cls.orders:
            raise ValueError(f"forecast.order = {spec.order!r}: the {cls.kind} forecast has orders {cls.orders}.")

    def names(self, block: int, kind: str) -> list[str]:
        """Block ``block``'s caches of ``kind``, newest first: ``order + 1`` names."""
        name = block_cache(block, kind)
        return [name if k == 0 else f"{name}.{k}" for k in range(self.order + 1)]

    def remember(self, delta: TensorSpec) -> tuple[int, int, int]:
        """Record the block's residual shape and dtype (``block_caches``); returns (block, B, N)."""
        self._shapes[delta.block], self._dtypes[delta.block] = delta.shape, delta.dtype
        return delta.block, delta.shape[0], delta.shape[1]

    def now(self, em: Emitter, block: int, timestep: fx.Node | None, tokens: int | None = None) -> fx.Node:
        """The current timestep as float32 [B, tokens] (default: the block's N)."""
        import torch

        if timestep is None:
            raise ValueError(f"forecast.kind = {self.kind!r} needs the model's timestep input in the graph.")
        aten = torch.ops.aten
        batch, n = self._shapes[block][:2]
        t = em(aten._to_copy.default, (timestep,), {"dtype": torch.float32})
        t = em(aten.reshape.default, (t, [-1, 1]))
        return em(aten.expand.default, (t, [batch, n if tokens is None else tokens]))

    def shift_in_full(self, em: Emitter, block: int, kinds: tuple[str, ...], old: dict[str, fx.Node]) -> dict:
        """FULL graph: every entry of ``kinds``' histories one place older (``clone`` of the value before the
        call, which the write-back pass turns into a buffer-to-buffer copy)."""
        import torch

        values = {}
        for kind in kinds:
            names = self.names(block, kind)
            for k in range(1, self.order + 1):
                values[names[k]] = em(torch.ops.aten.clone.default, (old[names[k - 1]],))
        return values

    def newton(self, em: Emitter, block: int, base: fx.Node, f: list, s: list, t: fx.Node, at: fx.Node) -> fx.Node:
        """``base + P(t) - P(at)``, with ``P`` Newton's polynomial through residuals ``f`` [B, N, D] at timestamps
        ``s`` [B, N] (newest first, an entry valid when older: a larger timestep; fewer valid entries lower the
        order). Per-token coefficients in float32, cast to the residuals' dtype."""
        import torch

        aten = torch.ops.aten

        def sub(a, b):
            return em(aten.sub.Tensor, (a, b))

        def mul(a, b):
            return em(aten.mul.Tensor, (a, b))

        def div(a, b):
            return em(aten.div.Tensor, (a, b))

        def gap(newer, older, valid):  # newer - older where valid, else 1 (a safe denominator)
            return em(aten.where.ScalarOther, (valid, sub(newer, older), 1.0))

        def mask(valid):
            return em(aten._to_copy.default, (valid,), {"dtype": torch.float32})

        # P(t) - P(at) = (t - at) [f0, f1] + ((t - s0)(t - s1) - (at - s0)(at - s1)) [f0, f1, f2]
        valid1 = em(aten.gt.Tensor, (s[1], s[0]))
        gap01 = gap(s[0], s[1], valid1)
        g1 = mul(div(sub(t, at), gap01), mask(valid1))  # coefficient of f0 - f1
        terms = [(g1, sub(f[0], f[1]))]
        if self.order == 2:
            valid2 = em(aten.logical_and.default, (valid1, em(aten.gt.Tensor, (s[2], s[1]))))
            gap12, gap02 = gap(s[1], s[2], valid2), gap(s[0], s[2], valid2)
            span = sub(mul(sub(t, s[0]), sub(t, s[1])), mul(sub(at, s[0]), sub(at, s[1])))
            c = mul(div(span, gap02), mask(valid2))
            terms[0] = (em(aten.add.Tensor, (g1, div(c, gap01))), terms[0][1])
            terms.append((em(aten.neg.default, (div(c, gap12),)), sub(f[1], f[2])))  # coefficient of f1 - f2
        out = base
        for g, difference in terms:
            g = em(aten.unsqueeze.default, (em(aten._to_copy.default, (g,), {"dtype": self._dtypes[block]}), -1))
            out = em(aten.addcmul.default, (out, g, difference))
        return out
