"""`TokenForecaster`: what a token not recomputed at a CACHED step gets, and the history it keeps.

A cached block's caches hold ``block{b}.delta`` [B, N, D], each token's residual when it was last
computed. At a CACHED step the block's K kept tokens are computed fresh; a forecaster gives the
residual of every token (`predict`), and the kept tokens' fresh residuals replace theirs. A block
with K = 0 is not run: all its tokens take the forecast (block-level forecasting).

A forecaster owns, in one class:

- ``check(spec)``: what its `tcpass.plan.ForecastSpec` fields must hold.
- Caches: ``block_caches`` (per cached block, after the token policy's) and ``carried``, the names of
  the block's caches the FULL graph reads as inputs (their values before the call) to shift a
  history: a FULL graph then takes those caches as inputs after the model inputs.
- FULL graph: ``full_values``, the nodes its caches are filled from.
- CACHED graph: ``predict`` (every token's residual, read before any cache is updated) and
  ``after_keep`` (its caches' updates for the kept tokens).

Every graph hook gets ``timestep``, the model's timestep input node: histories are stamped in the
model's own timestep units (an extrapolation is the same in any affine rescaling of them).

Executors zero every cache when a generation starts (`tcpass.controller.Decision.fresh`), so a
history never reaches across generations; a cached timestamp is then 0, never above a timestep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from tcpass.contracts import TensorSpec, block_cache

if TYPE_CHECKING:
    from torch import fx

    from tcpass.passes.emit import Emitter
    from tcpass.plan import ForecastSpec

FORECASTERS: dict[str, type[TokenForecaster]] = {}


def register_forecaster(cls: type[TokenForecaster]) -> type[TokenForecaster]:
    """Class decorator: registers ``cls`` under ``cls.kind`` (a kind registered twice is an error)."""
    kind = cls.__dict__.get("kind")
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__}: a registered forecaster sets kind, a non-empty string.")
    if kind in FORECASTERS and FORECASTERS[kind] is not cls:
        raise ValueError(f"forecast kind {kind!r} is registered twice ({FORECASTERS[kind].__name__}, {cls.__name__}).")
    FORECASTERS[kind] = cls
    return cls


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


@register_forecaster
class Reuse(TokenForecaster):
    """A pruned token reuses the residual cached when it was last computed (``x + delta``): no history."""

    kind = "reuse"

    def predict(self, em: Emitter, block: int, caches: dict[str, fx.Node], timestep: fx.Node) -> fx.Node:
        return caches[block_cache(block, "delta")]
