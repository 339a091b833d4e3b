"""Cluster propagation: a kept token's fresh update spread to the pruned tokens most like it.

At a CACHED step a cached block computes K kept tokens fresh; every other token gets its forecaster's
residual (`tcpass.forecasters.base.TokenForecaster.predict`). A kept token's *correction*, its fresh
residual minus its own forecast, says how far the forecast is off in its neighbourhood. With
``forecast.propagate = w > 0`` each pruned token adds ``w`` times the correction of the kept token whose
cached residual (``block{b}.delta``, each token's residual when last computed) is most like its own
(cosine similarity):

    sim      = normalize(delta) @ normalize(delta[idx])^T        # [B, N, K]
    nearest  = argmax(sim, -1)                                   # [B, N]: a Voronoi clustering around the kept
    forecast = forecast + w * gather(fresh_kept - forecast[idx], nearest)

This is ClusCa's propagation (Zheng et al., 2025: tokens clustered, about one per cluster recomputed, its update
given to the cluster) with the clusters drawn around the tokens the selector keeps, so no clustering step runs
and every shape is static: one [B, N, K] similarity per block (N * K * D multiply-adds per row, against the
block's ~12 * N * D^2), one argmax, two gathers; 0 graph breaks under torch.compile, ONNX ArgMax/GatherElements.
The kept tokens' own rows are then replaced by their fresh residuals as without propagation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import fx

    from tcpass.passes.emit import Emitter

EPS = 1e-6  # added to the norms: a zero residual has no direction and is like none


def propagate(
    em: Emitter,
    forecast: fx.Node,
    cached: fx.Node,
    idx: fx.Node,
    fresh_kept: fx.Node,
    shape: list[int],
    k: int,
    weight: float,
) -> fx.Node:
    """Graph nodes: ``forecast`` [B, N, D] plus ``weight`` times each token's nearest kept token's correction.

    ``cached``: the block's residual cache [B, N, D] before this step (the similarity's features); ``idx``
    [B, K]: the kept tokens; ``fresh_kept`` [B, K, D]: their fresh residuals; ``shape``: [B, N, D]."""
    import torch

    aten = torch.ops.aten
    features = em(aten._to_copy.default, (cached,), {"dtype": torch.float32})
    norm = em(aten.sqrt.default, (em(aten.sum.dim_IntList, (em(aten.mul.Tensor, (features, features)), [-1], True)),))
    unit = em(aten.div.Tensor, (features, em(aten.add.Tensor, (norm, EPS))))
    unit_kept = em.gather(unit, 1, idx, shape, k)  # [B, K, D]
    sim = em(aten.bmm.default, (unit, em(aten.transpose.int, (unit_kept, 1, 2))))  # [B, N, K]
    nearest = em(aten.argmax.default, (sim, -1))  # [B, N] in 0..K-1
    correction = em(aten.sub.Tensor, (fresh_kept, em.gather(forecast, 1, idx, shape, k)))  # [B, K, D]
    spread = em(aten.gather.default, (correction, 1, em.index_like(nearest, shape, 1)))  # [B, N, D]
    return em(aten.add.Tensor, (forecast, em(aten.mul.Tensor, (spread, weight))))
