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

from tcpass.contracts import TensorSpec
from tcpass.forecasters.base import HistoryForecaster, register_forecaster

if TYPE_CHECKING:
    from torch import fx

    from tcpass.passes.emit import Emitter


@register_forecaster
class Taylor(HistoryForecaster):
    """Per-token Newton extrapolation of order ``spec.order`` in the timestep (module docstring)."""

    kind = "taylor"

    def block_caches(self, delta: TensorSpec) -> list[TensorSpec]:
        import torch

        b, batch, tokens = self.remember(delta)
        older = [dataclasses.replace(delta, name=n) for n in self.names(b, "delta")[1:]]
        stamps = [TensorSpec(n, b, "stamp", (batch, tokens), torch.float32) for n in self.names(b, "stamp")]
        return older + stamps

    def carried(self, block: int) -> tuple[str, ...]:
        return (*self.names(block, "delta")[:-1], *self.names(block, "stamp")[:-1])

    def full_values(
        self, em: Emitter, block: int, fresh: fx.Node, old: dict[str, fx.Node], timestep: fx.Node
    ) -> dict[str, fx.Node]:
        import torch

        stamp = em(torch.ops.aten.clone.default, (self.now(em, block, timestep),))
        return {self.names(block, "stamp")[0]: stamp, **self.shift_in_full(em, block, ("delta", "stamp"), old)}

    def predict(self, em: Emitter, block: int, caches: dict[str, fx.Node], timestep: fx.Node) -> fx.Node:
        f = [caches[n] for n in self.names(block, "delta")]
        s = [caches[n] for n in self.names(block, "stamp")]
        return self.newton(em, block, f[0], f, s, self.now(em, block, timestep), s[0])

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
            names = self.names(block, kind)
            for j in range(self.order, 0, -1):  # oldest first: each reads the next newer entry before it moves
                rows = em.gather(caches[names[j - 1]], 1, idx, full, k)
                updated[names[j]] = em.scatter(caches[names[j]], 1, idx, rows, full, k)
        stamp = self.names(block, "stamp")[0]
        updated[stamp] = em.scatter(caches[stamp], 1, idx, self.now(em, block, timestep, k), shape[:2], k)
