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
from tcpass.forecasters.base import HistoryForecaster, register_forecaster

if TYPE_CHECKING:
    from torch import fx

    from tcpass.passes.emit import Emitter


@register_forecaster
class Anchored(HistoryForecaster):
    """The FULL steps' Newton polynomial of order ``spec.order``, shifted through each token's last value."""

    kind = "anchored"

    def block_caches(self, delta: TensorSpec) -> list[TensorSpec]:
        import torch

        b, batch, tokens = self.remember(delta)
        full = [dataclasses.replace(delta, name=n, kind="full") for n in self.names(b, "full")]
        stamps = [TensorSpec(n, b, "stamp", (batch, tokens), torch.float32) for n in self.names(b, "full_stamp")]
        return [*full, *stamps, TensorSpec(block_cache(b, "stamp"), b, "stamp", (batch, tokens), torch.float32)]

    def carried(self, block: int) -> tuple[str, ...]:
        return (*self.names(block, "full")[:-1], *self.names(block, "full_stamp")[:-1])

    def full_values(
        self, em: Emitter, block: int, fresh: fx.Node, old: dict[str, fx.Node], timestep: fx.Node
    ) -> dict[str, fx.Node]:
        import torch

        clone, now = torch.ops.aten.clone.default, self.now(em, block, timestep)
        return {
            self.names(block, "full")[0]: em(clone, (fresh,)),
            self.names(block, "full_stamp")[0]: em(clone, (now,)),
            block_cache(block, "stamp"): em(clone, (now,)),
            **self.shift_in_full(em, block, ("full", "full_stamp"), old),
        }

    def predict(self, em: Emitter, block: int, caches: dict[str, fx.Node], timestep: fx.Node) -> fx.Node:
        f = [caches[n] for n in self.names(block, "full")]
        s = [caches[n] for n in self.names(block, "full_stamp")]
        last = caches[block_cache(block, "stamp")]
        return self.newton(em, block, caches[block_cache(block, "delta")], f, s, self.now(em, block, timestep), last)

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
        now = self.now(em, block, timestep, k)
        updated[stamp] = em.scatter(caches[stamp], 1, idx, now, list(self._shapes[block][:2]), k)
