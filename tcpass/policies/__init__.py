"""Token policies: which K tokens a cached block recomputes at a CACHED step, one module each.

Each module owns its policy whole (see `tcpass.policies.base.TokenPolicy`): the `SelectorSpec`
fields it needs, the caches it adds, what it contributes to the FULL and CACHED graphs, and, for
policies that choose outside the graph, one numpy definition of the indices shared by the torch
runtime and the ONNX Runtime one. ``SelectorSpec.kind`` names one of ``POLICIES``.

Adding a policy: a module here with a `TokenPolicy` subclass decorated by `register_policy`; the package
imports every module in it, so nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from tcpass.policies.base import POLICIES, TokenPolicy, register_policy

for _module in ("input_change", *sorted(m.name for m in pkgutil.iter_modules(__path__))):  # the default first
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

from tcpass.policies.static_scores import StaticScoreSelector  # noqa: E402


def policy_class(kind: str) -> type[TokenPolicy]:
    """The policy registered as ``kind``; ``ValueError`` naming the known kinds otherwise."""
    if kind not in POLICIES:
        raise ValueError(f"selector.kind = {kind!r} is unknown; expected one of {tuple(POLICIES)}.")
    return POLICIES[kind]


def make_policy(spec, plan_dir: str | Path | None = None) -> TokenPolicy:
    """The policy ``spec`` configures (its files loaded and checked, relative to ``plan_dir``)."""
    return policy_class(spec.kind)(spec, plan_dir)


__all__ = ["POLICIES", "StaticScoreSelector", "TokenPolicy", "make_policy", "policy_class", "register_policy"]
