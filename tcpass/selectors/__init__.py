"""Token selectors: which K tokens a cached block recomputes at a CACHED step, one module each.

Each module owns its selector whole (see `tcpass.selectors.base.TokenSelector`): the `SelectorSpec`
fields it needs, the caches it adds, what it contributes to the FULL and CACHED graphs, and, for
selectors that choose outside the graph, one numpy definition of the indices shared by the torch
runtime and the ONNX Runtime one. ``SelectorSpec.kind`` names one of ``SELECTORS``.

Adding a selector: a module here with a `TokenSelector` subclass decorated by `register_selector`; the package
imports every module in it, so nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from tcpass.selectors.base import SELECTORS, TokenSelector, register_selector

for _module in ("input_change", *sorted(m.name for m in pkgutil.iter_modules(__path__))):  # the default first
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

from tcpass.selectors.static_scores import StaticScoreSelector  # noqa: E402


def selector_class(kind: str) -> type[TokenSelector]:
    """The selector registered as ``kind``; ``ValueError`` naming the known kinds otherwise."""
    if kind not in SELECTORS:
        raise ValueError(f"selector.kind = {kind!r} is unknown; expected one of {tuple(SELECTORS)}.")
    return SELECTORS[kind]


def make_selector(spec, plan_dir: str | Path | None = None) -> TokenSelector:
    """The selector ``spec`` configures (its files loaded and checked, relative to ``plan_dir``)."""
    return selector_class(spec.kind)(spec, plan_dir)


__all__ = ["SELECTORS", "StaticScoreSelector", "TokenSelector", "make_selector", "selector_class", "register_selector"]
