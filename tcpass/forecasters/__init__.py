"""Token forecasters: what a pruned token (or a block not run, K = 0) gets at a CACHED step, one module each.

A cached block recomputes K of its N tokens at a CACHED step; the other tokens' residuals
(``block_out - block_in``) come from the block's caches. What they come from is a forecaster's
choice: ``reuse`` (the default, `tcpass.forecasters.base.Reuse`) takes the residual cached when each
token was last computed; other forecasters keep a per-token history and extrapolate it to the
current timestep. ``CachePlan.forecast`` (a `tcpass.plan.ForecastSpec`) names one by ``kind``.

Each module here owns its forecaster whole (`tcpass.forecasters.base.TokenForecaster`): its
settings' validation, the caches it adds per cached block (and which of them the FULL graph reads,
to shift a history), its nodes in the FULL and CACHED graphs, and its export payload. Adding a
forecaster is adding a module to this package with a subclass decorated by `register_forecaster`:
the package imports every module in it, so nothing else changes.

Graph hooks import torch when called, so that this package imports without torch (plans validate
their forecaster in the numpy runtime too).
"""

from __future__ import annotations

import importlib
import pkgutil

from tcpass.forecasters.base import FORECASTERS, HistoryForecaster, Reuse, TokenForecaster, register_forecaster

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def forecaster_class(kind: str) -> type[TokenForecaster]:
    """The forecaster registered as ``kind``; ``ValueError`` naming the known kinds otherwise."""
    if kind not in FORECASTERS:
        raise ValueError(f"forecast.kind = {kind!r} is unknown; expected one of {tuple(FORECASTERS)}.")
    return FORECASTERS[kind]


def make_forecaster(spec) -> TokenForecaster:
    """The forecaster ``spec`` (a `tcpass.plan.ForecastSpec`, or None: ``reuse``) configures."""
    if spec is None:
        return Reuse(None)
    return forecaster_class(spec.kind)(spec)


__all__ = [
    "FORECASTERS",
    "HistoryForecaster",
    "Reuse",
    "TokenForecaster",
    "forecaster_class",
    "make_forecaster",
    "register_forecaster",
]
