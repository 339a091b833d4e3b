"""Deprecated: token policies are token selectors now (`tcpass.selectors`), one word for the plan's
``selector`` field, the classes and the docs. These names still import, with a `DeprecationWarning`."""

from __future__ import annotations

import warnings

from tcpass.selectors import SELECTORS as POLICIES
from tcpass.selectors import TokenSelector as TokenPolicy
from tcpass.selectors import make_selector as make_policy
from tcpass.selectors import register_selector as register_policy
from tcpass.selectors import selector_class as policy_class

warnings.warn(
    "tcpass.policies is deprecated: import tcpass.selectors (TokenPolicy -> TokenSelector, register_policy -> "
    "register_selector, POLICIES -> SELECTORS, make_policy -> make_selector, policy_class -> selector_class).",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["POLICIES", "TokenPolicy", "make_policy", "policy_class", "register_policy"]
