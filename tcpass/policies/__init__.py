"""Token policies: which K tokens a cached block recomputes at a CACHED step, one module each.

Each module owns its policy whole (see `tcpass.policies.base.TokenPolicy`): the `SelectorSpec`
fields it needs, the caches it adds, what it contributes to the FULL and CACHED graphs, and, for
policies that choose outside the graph, one numpy definition of the indices shared by the torch
runtime and the ONNX Runtime one. ``SelectorSpec.kind`` names one of ``POLICIES``.

Adding a policy: a module here with a `TokenPolicy` subclass, and its class in the tuple below.
"""

from __future__ import annotations

from pathlib import Path

from tcpass.policies.base import TokenPolicy
from tcpass.policies.dynamic_predictor import DynamicPolicy
from tcpass.policies.input_change import InputChangePolicy
from tcpass.policies.random_tokens import RandomPolicy
from tcpass.policies.static_scores import StaticPolicy, StaticScoreSelector
from tcpass.policies.toca import TocaPolicy

POLICIES: dict[str, type[TokenPolicy]] = {
    p.kind: p for p in (InputChangePolicy, RandomPolicy, StaticPolicy, DynamicPolicy, TocaPolicy)
}


def policy_class(kind: str) -> type[TokenPolicy]:
    """The policy registered as ``kind``; ``ValueError`` naming the known kinds otherwise."""
    if kind not in POLICIES:
        raise ValueError(f"selector.kind = {kind!r} is unknown; expected one of {tuple(POLICIES)}.")
    return POLICIES[kind]


def make_policy(spec, plan_dir: str | Path | None = None) -> TokenPolicy:
    """The policy ``spec`` configures (its files loaded and checked, relative to ``plan_dir``)."""
    return policy_class(spec.kind)(spec, plan_dir)


__all__ = ["POLICIES", "StaticScoreSelector", "TokenPolicy", "make_policy", "policy_class"]
