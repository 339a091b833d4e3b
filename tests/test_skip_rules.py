"""A step caching method is one registered class (`tcpass.plan.SkipRule`), as a token selector or a
forecaster is.

``Band`` (a toy, defined only here: every call with ``lo <= t < hi`` skips the block stack and takes the
last computed residual times ``scale``) is registered by a fixture and then needs nothing else: it
round-trips through plan JSON, generates what the eager hook reference of ``tests/test_skip.py`` does,
compiles with inductor into three graphs without a graph break or recompile, and runs on ONNX Runtime
equal to torch at every step.
"""

from dataclasses import dataclass

import pytest

import tcpass
from tcpass import CachePlan, SkipRule, StepKind
from tcpass.plan import SKIP_RULES
from tests.conftest import make_dit
from tests.test_skip import SkipReference, compile_and_compare, export_and_compare_every_step, generate, timesteps
from tests.tolerance import REGROUPED, assert_close


@dataclass(frozen=True)
class Band(SkipRule):
    """Skip every call in the timestep band [lo, hi), reusing the last computed residual times ``scale``."""

    kind = "band"
    history = 1  # a skipped call reads the last computed step's residual
    lo: float = 0.0
    hi: float = 0.0
    scale: float = 1.0
    level: str = "stack"

    def __post_init__(self) -> None:
        if not 0 <= self.lo < self.hi <= 1000:
            raise ValueError(f"skip.lo, skip.hi = {self.lo!r}, {self.hi!r}: expected 0 <= lo < hi <= 1000.")

    def weights_at(self, timestep: float) -> tuple[float, ...] | None:
        return (self.scale,) if self.lo <= timestep < self.hi else None


@pytest.fixture
def band(monkeypatch):
    monkeypatch.setitem(SKIP_RULES, Band.kind, Band)  # what @register_skip_rule does, undone after the test
    ts = timesteps()
    return Band(lo=ts[8], hi=ts[2], scale=0.9)  # calls 3..8 of 12 (the band's top is open)


def test_a_registered_skip_rule_round_trips_and_is_checked(band, tmp_path):
    plan = CachePlan(skip=band)
    assert '"kind": "band"' in plan.to_json() and CachePlan.from_json(plan.to_json()) == plan
    tcpass.save_plan(plan, tmp_path / "plan.json")
    assert tcpass.load_plan(tmp_path / "plan.json") == plan
    with pytest.raises(ValueError, match=r"plan.skip has unknown field\(s\) \['width'\]"):
        CachePlan.from_dict({"skip": {"kind": "band", "lo": 1, "hi": 2, "width": 3}})
    with pytest.raises(ValueError, match=r"expected 0 <= lo < hi"):
        CachePlan.from_dict({"skip": {"kind": "band", "lo": 5, "hi": 2}})
    SKIP_RULES.pop("band")
    with pytest.raises(ValueError, match=r"skip.kind = 'band' is unknown; expected one of \('table'"):
        CachePlan.from_json(plan.to_json())


def test_a_registered_skip_rule_generates_what_the_eager_reference_does(band):
    tm = tcpass.transform(make_dit(), CachePlan(blocks=(), skip=band))
    out = generate(tm, seed=3)
    assert_close(out, generate(SkipReference(make_dit(), band), seed=3), units=REGROUPED)
    assert tm.step_counts[StepKind.SKIP] == 6 and tm.step_counts[StepKind.FULL] == 6


def test_a_registered_skip_rule_compiles_once_and_runs_on_onnx_runtime(band, tmp_path):
    plan = CachePlan(keep_ratio=0.5, skip=band)
    assert compile_and_compare(plan).step_counts[StepKind.SKIP] == 12  # two generations, six each
    assert export_and_compare_every_step(tmp_path, plan, generations=1).step_counts[StepKind.SKIP] == 6
