"""Cache plans: what TokenCache does to a model, as plain dataclasses that round-trip to JSON.

A plan names the transformer blocks to token-cache, how many tokens each recomputes at a CACHED
step, how kept tokens attend, which tokens are kept, and when steps are FULL or CACHED (the TPRR
schedule). Every field is validated when the plan is built, so a bad plan fails before anything is
traced; checks that need the model (block indices, model fingerprint) run in `tcpass.transform`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from tcpass.contracts import register_into
from tcpass.files import check_sha256, resolve_path, write_atomic
from tcpass.forecasters import FORECASTERS, forecaster_class
from tcpass.selectors import SELECTORS, selector_class

ATTENTION_MODES = ("full_kv", "cached_kv", "kept_only")
SKIP_LEVELS = ("stack", "output")
SAMPLERS = ("ddim", "dpmpp", "flow")  # `tcpass.sampling.make_scheduler`
MAX_SKIP_HISTORY = 4  # a SKIP step forecasts from at most this many computed steps' residuals
AttentionMode = Literal["full_kv", "cached_kv", "kept_only"]
_SHA256 = re.compile(r"[0-9a-f]{64}")
PLAN_FORMAT_VERSION = 1


def _json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, for error messages about plan files."""
    if value is None:
        return "null"
    for types, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), (Mapping, "object")):
        if isinstance(value, types):
            return name
    if isinstance(value, Iterable):
        return "list"
    return type(value).__name__


def _type_error(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{name} = {value!r}: type error: expected {expected}, got {_json_type(value)}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_timesteps(timesteps: Sequence[int], num_steps: int, sampler: str | None) -> list[int]:
    """``timesteps`` as a list of ints, or a ValueError naming what is wrong: DPM-Solver++ only, ``num_steps``
    training timesteps (integers in 0..999), strictly decreasing."""
    if sampler != "dpmpp":
        raise ValueError(
            f"timesteps given with sampler = {sampler!r}: custom timesteps are supported for 'dpmpp' only; drop "
            "them or use sampler='dpmpp'."
        )
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
        raise _type_error("timesteps", timesteps, "a list of integer training timesteps")
    values = list(timesteps)
    if len(values) != num_steps:
        raise ValueError(f"{len(values)} timesteps given for num_steps = {num_steps}: pass one timestep per step.")
    for i, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not float(t).is_integer() or not 0 <= t < 1000:
            raise ValueError(f"timesteps[{i}] = {t!r}: expected an integer training timestep in 0..999.")
        if i and t >= values[i - 1]:
            raise ValueError(f"timesteps[{i}] = {t!r} follows {values[i - 1]!r}: timesteps must strictly decrease.")
    return [int(t) for t in values]


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    """A JSON list or a Python sequence/iterable standing for one; strings and objects are not."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))


def keep_count(ratio: float, num_tokens: int) -> int:
    """K = ceil(ratio * num_tokens), at least 1 and at most ``num_tokens``; 0 for ratio 0 (whole-block reuse).

    The one definition of K: graphs, selectors, FLOP counts and calibration all use it.
    """
    if ratio == 0:
        return 0
    return max(1, min(num_tokens, math.ceil(ratio * num_tokens)))


def _check_ratio(name: str, value: float) -> None:
    if not _is_number(value):
        raise _type_error(name, value, "a number in [0, 1]")
    if not (0.0 <= value <= 1.0):
        raise ValueError(
            f"{name} = {value!r} is outside [0, 1]: it is the fraction of image tokens a cached block "
            "recomputes at a CACHED step (1.0 recomputes all tokens, 0.25 a quarter, 0 reuses the whole "
            "block's cached residual: FORA-style block caching)."
        )


@dataclass(frozen=True)
class TPRRSchedule:
    """Two-phase round-robin schedule, keyed on the timestep value the model receives.

    Timesteps ``>= boundary_timestep`` belong to phase 0 (early, noisy steps), the rest to phase 1.
    Inside a phase the schedule cycles: one FULL step, then ``interval - 1`` CACHED steps. The first
    ``warmup_full_steps`` calls of a generation, the first call after a phase change, and every call
    with a timestep below ``full_below_timestep`` are FULL. The step count is never needed: a new
    generation is detected when the timestep goes up again.

    Attributes:
        boundary_timestep: phase split, in the model's timestep units (DiT: 0..999). Default 500.
        intervals: cycle length per phase (phase 0, phase 1), in model calls. Raising an interval
            means more CACHED steps: faster, with more drift from the full-compute output.
            1 means every step of that phase is FULL.
        warmup_full_steps: how many calls at the start of each generation are FULL (>= 1).
        full_below_timestep: calls with timestep below this are FULL (protects the last, detail-
            forming steps); ``None`` disables it.
    """

    boundary_timestep: float = 500.0
    intervals: tuple[int, int] = (4, 4)
    warmup_full_steps: int = 1
    full_below_timestep: float | None = None

    def __post_init__(self) -> None:
        if not _is_list(self.intervals):
            raise _type_error("schedule.intervals", self.intervals, "a list of two integers >= 1")
        object.__setattr__(self, "intervals", tuple(self.intervals))
        for phase, n in enumerate(self.intervals):
            if not _is_integer(n):
                raise _type_error(f"schedule.intervals[{phase}]", n, "an integer >= 1")
        if len(self.intervals) != 2 or any(n < 1 for n in self.intervals):
            raise ValueError(
                f"schedule.intervals = {self.intervals!r}: expected two integers >= 1 "
                "(cycle length of phase 0 and of phase 1; 1 = every step FULL)."
            )
        if not _is_integer(self.warmup_full_steps):
            raise _type_error("schedule.warmup_full_steps", self.warmup_full_steps, "an integer >= 1")
        if self.warmup_full_steps < 1:
            raise ValueError(
                f"schedule.warmup_full_steps = {self.warmup_full_steps!r}: expected an integer >= 1 "
                "(the first call of a generation is always FULL: it fills the caches)."
            )
        for name in ("boundary_timestep", "full_below_timestep"):
            value = getattr(self, name)
            if value is None and name == "full_below_timestep":
                continue
            if not _is_number(value):
                expected = "a finite number (timestep units)" + (" or null" if name == "full_below_timestep" else "")
                raise _type_error(f"schedule.{name}", value, expected)
            if not math.isfinite(value):
                raise ValueError(f"schedule.{name} = {value!r}: expected a finite number (timestep units).")


@dataclass(frozen=True)
class SelectorSpec:
    """Which tokens a cached block recomputes at a CACHED step: a token selector and its settings.

    ``kind`` names a selector of `tcpass.selectors` (each module there documents its own): ``input_change``
    (default; training-free, in the graph), ``random`` (the baseline), ``static`` (a score table per
    block and timestep), ``dynamic`` (the dynamic Cache Predictor, in the graph) or ``toca``.
    ``seed``: the ``random`` selector's generator seed, reset at every generation. ``path``/``sha256``:
    the file a selector reads (``static``: token scores; ``dynamic``: predictor weights), relative to the
    plan's directory, and its required checksum.
    """

    kind: str = "input_change"
    seed: int = 0
    path: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str):
            raise _type_error("selector.kind", self.kind, f"one of {tuple(SELECTORS)}")
        selector = selector_class(self.kind)
        if not _is_integer(self.seed):
            raise _type_error("selector.seed", self.seed, "an integer")
        if self.path is not None and not isinstance(self.path, str):
            raise _type_error("selector.path", self.path, "a file path (string) or null")
        if self.sha256 is not None and not (isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256)):
            raise ValueError(f"selector.sha256 = {self.sha256!r}: expected 64 lowercase hex digits or null.")
        selector.check(self)


@dataclass(frozen=True)
class ForecastSpec:
    """What a token not recomputed at a CACHED step gets: a forecaster of `tcpass.forecasters` and its settings.

    ``kind``: ``reuse`` (the residual cached when the token was last computed; what a plan without
    ``forecast`` does) or a forecaster that extrapolates each token's own history (each module of
    `tcpass.forecasters` documents its kind). ``order``: the forecast's order, for forecasters that
    read a history (order p reads the last p + 1 steps at which each token was computed); each order
    costs the history one more cached residual [B, N, D] per cached block. ``propagate``: cluster
    propagation, in [0, 1]: each pruned token also gets this fraction of the correction (fresh minus
    forecast residual) of the kept token most like it (`tcpass.forecasters.propagation`); 0: none.
    """

    kind: str
    order: int = 1
    propagate: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str):
            raise _type_error("forecast.kind", self.kind, f"one of {tuple(FORECASTERS)}")
        forecaster = forecaster_class(self.kind)
        if not _is_integer(self.order):
            raise _type_error("forecast.order", self.order, "an integer")
        if not _is_number(self.propagate):
            raise _type_error("forecast.propagate", self.propagate, "a fraction in [0, 1]")
        if not 0 <= self.propagate <= 1:
            raise ValueError(f"forecast.propagate = {self.propagate!r}: expected a fraction in [0, 1] (0: none).")
        object.__setattr__(self, "propagate", float(self.propagate))
        forecaster.check(self)


def forecast_name(spec: ForecastSpec | None) -> str:
    """``reuse``, or ``kind:order`` (``anchored:1``), with ``+W`` for cluster propagation of weight W
    (``taylor:1+0.5``, ``reuse+1``): how the CLI, the benches and reports name what pruned tokens get."""
    if spec is None:
        return "reuse"
    name = "reuse" if spec.kind == "reuse" else f"{spec.kind}:{spec.order}"
    return name + (f"+{spec.propagate:g}" if spec.propagate else "")


def parse_forecast(text: str) -> ForecastSpec | None:
    """The inverse of `forecast_name`: ``reuse`` is None; ``ValueError`` names a bad kind, order or weight."""
    text = text.strip()
    base, plus, weight = text.partition("+")
    if base == "reuse" and not plus:
        return None
    kind, _, order = base.partition(":")
    try:
        propagate = float(weight) if plus else 0.0
    except ValueError:
        propagate = None
    if (order and not order.isdigit()) or propagate is None:
        raise ValueError(
            f"forecast {text!r}: expected reuse or kind:order, each optionally +W for cluster propagation of "
            "weight W in [0, 1], e.g. anchored:1, taylor:1+0.5, reuse+1."
        )
    return ForecastSpec(kind=kind, order=int(order or 1), propagate=propagate)


SKIP_RULES: dict[str, type[SkipRule]] = {}

register_skip_rule = register_into(SKIP_RULES, "skip rule")
"""Class decorator: registers a `SkipRule` dataclass under its ``kind`` (a kind registered twice is an error)."""


class SkipRule:
    """Which whole steps a plan skips and what their block stack's residual is predicted from: a step
    caching method, one registered frozen dataclass (``CachePlan.skip``). Torch-free: the step controller
    (`tcpass.schedule.TPRRState`) asks it about each call, and everything downstream reads only
    ``level`` and ``history`` (the SKIP graph and its caches, both runtimes, the export, FLOPs and the speed
    model follow from them), so a rule is one class. Its JSON is its dataclass fields plus ``kind`` (omitted
    for the ``table`` kind, the format before rules were registered), checked by the generic loader.

    Subclasses are frozen dataclasses that set ``kind``, validate in ``__post_init__`` (a ``ValueError`` naming
    the field), and define:

    - ``level``: ``"stack"`` (embed, add the predicted stack residual, run the output layers) or ``"output"``;
    - ``history``: how many computed steps' residuals a SKIP step reads (newest first; 1..4);
    - ``weights_at(timestep)``: the weights on those residuals, newest first, if a call at ``timestep``
      (0..1000) is skipped, else None. A SKIP is granted only once as many calls were computed in the
      generation as the weights read (up to the last nonzero weight, `tcpass.schedule.reads`: a forecast
      early in a generation gives the residuals not yet computed weight 0), never at its first call, and
      SKIP calls do not advance the TPRR cycle.
    """

    kind: ClassVar[str]
    level: str
    history: int

    def weights_at(self, timestep: float) -> tuple[float, ...] | None:
        raise NotImplementedError

    def scale_at(self, timestep: float) -> float | None:
        """The residual factor if a call at ``timestep`` is skipped (forecasts: the newest residual's weight)."""
        w = self.weights_at(timestep)
        return None if w is None else w[0]

    def to_dict(self) -> dict[str, Any]:
        """The rule's JSON object: its fields (tuples as lists), and ``kind`` unless it is ``table``."""
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return d if self.kind == StepSkip.kind else {"kind": self.kind, **d}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SkipRule:
        """The registered rule ``d["kind"]`` names (default ``table``), built from the other fields."""
        if not isinstance(d, Mapping):
            raise _type_error("plan.skip", d, "a JSON object")
        d = dict(d)
        kind = d.pop("kind", StepSkip.kind)
        if kind not in SKIP_RULES:
            raise ValueError(f"skip.kind = {kind!r} is unknown; expected one of {tuple(SKIP_RULES)}.")
        cls = SKIP_RULES[kind]
        _reject_unknown("plan.skip", d, cls)
        return cls(**d)


def _jsonable(value: Any) -> Any:
    """``value`` with tuples (nested) as lists, for JSON."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


@register_skip_rule
@dataclass(frozen=True)
class StepSkip(SkipRule):
    """Whole steps whose block stack is not run: a calibrated, irregular table keyed by timestep (the
    ``table`` `SkipRule`).

    A call whose timestep is within ``tolerance`` of ``timesteps[i]`` is a SKIP step (unless it starts
    a generation, or fewer calls have been computed in it than its weights read, up to the last nonzero
    one): no transformer block runs, and the block stack's residual is predicted from the residuals of
    the last computed steps: reused (scaled by ``scales[i]``), or forecast as ``sum_k weights[i][k] *
    residual_k`` over the last ``history`` computed steps, newest first. Every other call runs as the
    TPRR schedule says (FULL or CACHED); SKIP calls do not advance its cycle. The table is keyed by
    timestep value, so it fits the sampler grid it was calibrated on (`tcpass calibrate` writes it);
    calls at other timesteps are simply computed.

    Attributes:
        timesteps: model-scale timesteps (0..1000, the value the model receives) of the skipped calls.
            More entries: faster (a SKIP step costs only the embedding and output layers, or
            nothing), further from full compute.
        scales: per entry, the factor applied to the reused residual (MagCache's product of
            calibrated magnitude ratios since the last computed step); ``None``: all 1 (plain reuse).
        weights: per entry, the forecast's weights on the residuals of the last ``len(weights[i])``
            computed steps, newest first (all entries the same length, 1..4; ``None``: no forecast).
            ``[1]`` is plain reuse, ``[s]`` a scaled reuse, ``[1 + c, -c]`` a first-order
            extrapolation; `tcpass calibrate` fits them by least squares on the model's own
            generations. Trailing zeros: an entry early in a generation, skipped before all
            ``history`` residuals exist (``[w0, w1, 0]`` after two computed steps). Exclusive with
            ``scales``.
        level: ``"stack"``: the current input is embedded and the output layers run on
            ``embedded + predicted stack residual`` (``last block out - first block in``), as
            MagCache does; ``"output"``: the model output itself is predicted from the last computed
            outputs (nothing runs; with DDIM and scale 1 this equals a coarser DDIM step).
        tolerance: how far (timestep units) a call's timestep may be from a table entry.
    """

    kind: ClassVar[str] = "table"
    timesteps: tuple[float, ...] = ()
    scales: tuple[float, ...] | None = None
    weights: tuple[tuple[float, ...], ...] | None = None
    level: str = "stack"
    tolerance: float = 0.5

    def __post_init__(self) -> None:
        if not _is_list(self.timesteps):
            raise _type_error("skip.timesteps", self.timesteps, "a list of timesteps")
        timesteps = tuple(self.timesteps)
        for i, t in enumerate(timesteps):
            if not _is_number(t):
                raise _type_error(f"skip.timesteps[{i}]", t, "a timestep in [0, 1000]")
            if not math.isfinite(t) or not 0 <= t <= 1000:
                raise ValueError(f"skip.timesteps[{i}] = {t!r}: expected a finite timestep in [0, 1000].")
        object.__setattr__(self, "timesteps", tuple(float(t) for t in timesteps))
        if self.scales is not None:
            if not _is_list(self.scales):
                raise _type_error("skip.scales", self.scales, "a list of factors or null")
            scales = tuple(self.scales)
            if len(scales) != len(timesteps):
                raise ValueError(
                    f"skip.scales = {self.scales!r}: expected one factor per skip.timesteps entry "
                    f"({len(timesteps)}), or null for plain reuse."
                )
            for i, f in enumerate(scales):
                if not _is_number(f):
                    raise _type_error(f"skip.scales[{i}]", f, "a factor in (0, 10]")
                if not math.isfinite(f) or not 0 < f <= 10:
                    raise ValueError(f"skip.scales[{i}] = {f!r}: expected a finite factor in (0, 10].")
            object.__setattr__(self, "scales", tuple(float(f) for f in scales))
        if self.weights is not None:
            object.__setattr__(self, "weights", self._checked_weights(len(timesteps)))
        if not isinstance(self.level, str):
            raise _type_error("skip.level", self.level, f"one of {SKIP_LEVELS}")
        if self.level not in SKIP_LEVELS:
            raise ValueError(f"skip.level = {self.level!r} is unknown; expected one of {SKIP_LEVELS}.")
        tol = self.tolerance
        if not _is_number(tol):
            raise _type_error("skip.tolerance", tol, "a number >= 0 (timestep units)")
        if not math.isfinite(tol) or tol < 0:
            raise ValueError(f"skip.tolerance = {tol!r}: expected a finite number >= 0 (timestep units).")

    def _checked_weights(self, n: int) -> tuple[tuple[float, ...], ...]:
        if self.scales is not None:
            raise ValueError("skip.scales and skip.weights are both set: give one (scales = weights [s]).")
        if not _is_list(self.weights):
            raise _type_error("skip.weights", self.weights, "a list of weight lists or null")
        rows = tuple(self.weights)
        if len(rows) != n:
            raise ValueError(
                f"skip.weights has {len(rows)} entries: expected one weight list per skip.timesteps entry ({n})."
            )
        out = []
        for i, row in enumerate(rows):
            if not _is_list(row):
                raise _type_error(f"skip.weights[{i}]", row, f"a list of 1..{MAX_SKIP_HISTORY} weights")
            if not 1 <= len(row) <= MAX_SKIP_HISTORY or len(row) != len(rows[0]):
                raise ValueError(
                    f"skip.weights[{i}] has {len(row)} weights: every entry needs the same number, "
                    f"1..{MAX_SKIP_HISTORY} (one per remembered computed step)."
                )
            for k, w in enumerate(row):
                if not _is_number(w):
                    raise _type_error(f"skip.weights[{i}][{k}]", w, "a number in [-10, 10]")
                if not math.isfinite(w) or abs(w) > 10:
                    raise ValueError(f"skip.weights[{i}][{k}] = {w!r}: expected a finite weight in [-10, 10].")
            out.append(tuple(float(w) for w in row))
        return tuple(out)

    @property
    def history(self) -> int:
        """How many computed steps' residuals a SKIP step reads (1: the last one)."""
        return 1 if not self.weights else len(self.weights[0])

    def weights_at(self, timestep: float) -> tuple[float, ...] | None:
        """The residual weights (newest first) if a call at ``timestep`` is skipped, else ``None``."""
        for i, t in enumerate(self.timesteps):
            if abs(timestep - t) <= self.tolerance:
                if self.weights is not None:
                    return self.weights[i]
                return (1.0 if self.scales is None else self.scales[i],)
        return None


@dataclass(frozen=True)
class ModelFingerprint:
    """What a plan was made for; `transform` refuses a plan whose fingerprint differs from the model."""

    model_class: str
    num_blocks: int
    hidden_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.model_class, str):
            raise _type_error("model.model_class", self.model_class, "a class name (string)")
        for name in ("num_blocks", "hidden_size"):
            value = getattr(self, name)
            if not _is_integer(value):
                raise _type_error(f"model.{name}", value, "an integer >= 1")
            if value < 1:
                raise ValueError(f"model.{name} = {value!r}: expected an integer >= 1.")


@dataclass(frozen=True)
class CachePlan:
    """Everything `tcpass.transform` needs to know.

    Attributes:
        blocks: indices of the transformer blocks to token-cache, or ``"all"``. More blocks: faster,
            further from the full-compute output.
        keep_ratio: fraction of image tokens [0, 1] each cached block recomputes at a CACHED step, per
            phase (phase 0, phase 1). K = ceil(keep_ratio * num_tokens), fixed per graph so shapes
            are static. Lower: faster, further from full compute. 0: the block is not run at a
            CACHED step, its whole cached residual is reused (FORA-style block caching).
        block_keep_ratio: per-block overrides of ``keep_ratio``, ``{block: (phase0, phase1)}``.
        attention: how the kept tokens attend at a CACHED step.
            ``full_kv``: queries of the K kept tokens, keys/values of all N current tokens; kept rows
            are exactly what the uncached block would give. ``cached_kv``: keys/values of pruned tokens
            come from a per-block cache (refreshed at FULL steps, kept tokens at every step); costs K
            instead of N for the K/V projections. ``kept_only``: attention among kept tokens only;
            cheapest, least exact.
        schedule: the TPRR schedule (which calls are FULL and which CACHED).
        selector: which tokens are kept (see `SelectorSpec`).
        model: fingerprint of the model the plan was made for; ``None`` fits any model.
        skip: whole steps whose block stack is skipped: a `SkipRule` (the calibrated table `StepSkip`, or any
            registered rule); ``None`` skips none.
        forecast: what tokens not recomputed at a CACHED step get (`ForecastSpec`); ``None``: the
            residual cached when each was last computed (``reuse``).
        sampler_steps: the "fewer sampler steps" baseline: samplers driven by tcpass (`tcpass demo`,
            `tcpass generate`, the benchmarks) run this many steps instead of the requested count.
            The transformed model itself ignores it (it never controls the caller's sampler).
        guidance_reuse: split classifier-free guidance, for samplers driven by tcpass
            (`tcpass.sampling.guided_sample` with the transformed model: `tcpass demo`, the
            benchmarks, `tcpass serve`'s torch runtime). ``False``: the model sees ``[cond; uncond]``
            (2B rows) at every step. ``True``: the conditional rows (B) run at every step under
            this plan; the unconditional rows run as a second stream (its own cache context) only
            at guided steps where the conditional stream computes (FULL or CACHED, not SKIP) and
            at the first guided step; at the other guided steps the guidance reuses the last
            computed ``cond - uncond`` difference, and outside a guidance interval the
            unconditional rows never run (`tcpass.schedule.runs_uncond`). The transformed model
            itself ignores it; export such a plan at one stream's batch (B rows),
            `tcpass.export.ort_runtime.generate` runs the split.
        guidance_every: with ``guidance_reuse``, the unconditional rows run at one in every
            ``guidance_every`` guided steps where the conditional stream computes (and at the first
            guided step); the others reuse the last ``cond - uncond`` difference, as FasterCache's CFG
            cache does. 1: at every such step.
        sampler: the sampler the plan was calibrated under, for samplers driven by tcpass (`tcpass demo`,
            the benchmarks): ``"ddim"``, ``"dpmpp"`` (DPM-Solver++(2M)) or ``"flow"`` (flow-matching
            Euler); ``None``: the model family's own (DDIM for DiT and PixArt). A skip table is keyed by
            the timesteps of the sampler and step count it was calibrated on, so `tcpass calibrate steps
            --sampler` records both (``sampler_steps``). The transformed model itself ignores it.
        sampler_timesteps: with ``sampler`` ``"dpmpp"``, the training timesteps (integers 0..999, strictly
            decreasing, one per sampler step) the samplers driven by tcpass step through instead of evenly
            spaced ones: a schedule calibrated for the model (`bench/timestep_search.py`). ``sampler_steps``
            is their count. ``None``: diffusers' default spacing. The ONNX Runtime sampler steps through them too.
        notes: free-form provenance (what `tcpass calibrate` measured); never read by tcpass.
    """

    blocks: tuple[int, ...] | str = "all"
    keep_ratio: tuple[float, float] = (0.25, 0.25)
    block_keep_ratio: dict[int, tuple[float, float]] = field(default_factory=dict)
    attention: str = "full_kv"
    schedule: TPRRSchedule = field(default_factory=TPRRSchedule)
    selector: SelectorSpec = field(default_factory=SelectorSpec)
    model: ModelFingerprint | None = None
    skip: SkipRule | None = None
    forecast: ForecastSpec | None = None
    sampler_steps: int | None = None
    guidance_reuse: bool = False
    guidance_every: int = 1
    sampler: str | None = None
    sampler_timesteps: tuple[int, ...] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.guidance_reuse, bool):
            raise _type_error("guidance_reuse", self.guidance_reuse, "true or false")
        if not _is_integer(self.guidance_every):
            raise _type_error("guidance_every", self.guidance_every, "a positive integer")
        if self.guidance_every < 1 or (self.guidance_every > 1 and not self.guidance_reuse):
            raise ValueError(
                f"guidance_every = {self.guidance_every!r}: expected a positive integer, above 1 only with "
                "guidance_reuse = true (it spaces the unconditional stream's computed steps)."
            )
        if self.sampler_steps is not None:
            if not _is_integer(self.sampler_steps):
                raise _type_error("sampler_steps", self.sampler_steps, "a positive integer or null")
            if self.sampler_steps < 1:
                raise ValueError(f"sampler_steps = {self.sampler_steps!r}: expected a positive integer or null.")
        if self.sampler is not None:
            if not isinstance(self.sampler, str):
                raise _type_error("sampler", self.sampler, f"one of {SAMPLERS} or null")
            if self.sampler not in SAMPLERS:
                raise ValueError(
                    f"sampler = {self.sampler!r} is unknown; expected one of {SAMPLERS}, or null for the "
                    "model family's own."
                )
        if self.sampler_timesteps is not None:
            count = len(self.sampler_timesteps) if _is_list(self.sampler_timesteps) else 0
            if self.sampler_steps is not None and self.sampler_steps != count:
                raise ValueError(
                    f"sampler_steps = {self.sampler_steps!r} with {count} sampler_timesteps: expected one timestep "
                    "per sampler step (or sampler_steps null)."
                )
            try:
                ts = tuple(check_timesteps(self.sampler_timesteps, count, self.sampler))
            except ValueError as e:
                raise ValueError(f"sampler_timesteps = {self.sampler_timesteps!r}: {e}") from None
            object.__setattr__(self, "sampler_timesteps", ts)
            object.__setattr__(self, "sampler_steps", count)
        if not isinstance(self.notes, dict):
            raise _type_error("notes", self.notes, "a JSON object")
        if isinstance(self.blocks, str):
            if self.blocks != "all":
                raise ValueError(f"blocks = {self.blocks!r}: expected 'all' or a list of block indices.")
        elif not _is_list(self.blocks):
            raise _type_error("blocks", self.blocks, "'all' or a list of block indices")
        else:
            blocks = tuple(self.blocks)
            for i, b in enumerate(blocks):
                if not _is_integer(b):
                    raise _type_error(f"blocks[{i}]", b, "a non-negative block index (integer)")
                if b < 0:
                    raise ValueError(f"blocks[{i}] = {b!r}: expected a non-negative block index.")
            if len(set(blocks)) != len(blocks):
                raise ValueError(f"blocks = {list(blocks)} lists a block twice.")
            object.__setattr__(self, "blocks", tuple(sorted(blocks)))
        object.__setattr__(self, "keep_ratio", _ratio_pair("keep_ratio", self.keep_ratio))
        if not isinstance(self.block_keep_ratio, Mapping):
            raise _type_error("block_keep_ratio", self.block_keep_ratio, "an object {block: [r0, r1]}")
        overrides = {}
        for b, r in self.block_keep_ratio.items():
            if not _is_integer(b) or b < 0:
                raise ValueError(f"block_keep_ratio key {b!r}: expected a non-negative block index.")
            overrides[b] = _ratio_pair(f"block_keep_ratio[{b}]", r)
        object.__setattr__(self, "block_keep_ratio", overrides)
        if not isinstance(self.attention, str):
            raise _type_error("attention", self.attention, f"one of {ATTENTION_MODES}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention = {self.attention!r} is unknown; expected one of {ATTENTION_MODES}.")
        if not isinstance(self.schedule, TPRRSchedule):
            raise TypeError(f"schedule must be a TPRRSchedule, got {type(self.schedule).__name__}.")
        if not isinstance(self.selector, SelectorSpec):
            raise TypeError(f"selector must be a SelectorSpec, got {type(self.selector).__name__}.")
        if self.skip is not None and not isinstance(self.skip, SkipRule):
            raise TypeError(f"skip must be a SkipRule (e.g. a StepSkip) or None, got {type(self.skip).__name__}.")
        if self.forecast is not None and not isinstance(self.forecast, ForecastSpec):
            raise TypeError(f"forecast must be a ForecastSpec or None, got {type(self.forecast).__name__}.")

    @classmethod
    def no_cache(cls) -> CachePlan:
        """A plan that caches nothing: the transformed model computes exactly what the original does."""
        return cls(blocks=())

    def resolve_blocks(self, num_blocks: int) -> tuple[int, ...]:
        """The block indices this plan caches in a model of ``num_blocks`` blocks; raises on bad ones."""
        for b in self.block_keep_ratio:
            if b >= num_blocks:
                raise ValueError(
                    f"plan.block_keep_ratio names block {b} but the model has {num_blocks} blocks "
                    f"(0..{num_blocks - 1})."
                )
        if self.blocks == "all":
            return tuple(range(num_blocks))
        for i, b in enumerate(self.blocks):
            if b >= num_blocks:
                raise ValueError(
                    f"plan.blocks[{i}] = {b} but the model has {num_blocks} transformer blocks "
                    f"(0..{num_blocks - 1}); remove it or use blocks='all'."
                )
        return tuple(self.blocks)

    def keep_tokens(self, block: int, phase: int, num_tokens: int) -> int:
        """K: how many of ``num_tokens`` tokens ``block`` recomputes at a CACHED step of ``phase``."""
        return keep_count(self.block_keep_ratio.get(block, self.keep_ratio)[phase], num_tokens)

    # JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks"] = self.blocks if isinstance(self.blocks, str) else list(self.blocks)
        d["keep_ratio"] = list(self.keep_ratio)
        d["block_keep_ratio"] = {str(b): list(r) for b, r in self.block_keep_ratio.items()}
        d["schedule"]["intervals"] = list(self.schedule.intervals)
        if self.skip is not None:
            d["skip"] = self.skip.to_dict()
        return {"format_version": PLAN_FORMAT_VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CachePlan:
        if not isinstance(d, Mapping):
            raise _type_error("plan", d, "a JSON object")
        d = dict(d)
        version = d.pop("format_version", PLAN_FORMAT_VERSION)
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(f"plan format_version = {version!r}; this tcpass reads version {PLAN_FORMAT_VERSION}.")
        _reject_unknown("plan", d, cls)
        kwargs: dict[str, Any] = dict(d)
        if "schedule" in d:
            _reject_unknown("plan.schedule", d["schedule"], TPRRSchedule)
            kwargs["schedule"] = TPRRSchedule(**d["schedule"])
        if "selector" in d:
            _reject_unknown("plan.selector", d["selector"], SelectorSpec)
            kwargs["selector"] = SelectorSpec(**d["selector"])
        if d.get("skip") is not None:
            kwargs["skip"] = SkipRule.from_dict(d["skip"])
        if d.get("forecast") is not None:
            _reject_unknown("plan.forecast", d["forecast"], ForecastSpec)
            kwargs["forecast"] = ForecastSpec(**d["forecast"])
        if d.get("model") is not None:
            _reject_unknown("plan.model", d["model"], ModelFingerprint)
            kwargs["model"] = ModelFingerprint(**d["model"])
        if "block_keep_ratio" in d:
            overrides = d["block_keep_ratio"]
            if not isinstance(overrides, Mapping):
                raise _type_error("block_keep_ratio", overrides, "an object {block: [r0, r1]}")
            try:
                kwargs["block_keep_ratio"] = {int(b): r for b, r in overrides.items()}
            except ValueError as e:
                raise ValueError(
                    f"block_keep_ratio = {overrides!r}: keys must be block indices, {{block: [r0, r1]}}."
                ) from e
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> CachePlan:
        return cls.from_dict(json.loads(text))


def _ratio_pair(name: str, value: Any) -> tuple[float, float]:
    if _is_number(value):
        value = (value, value)
    if not _is_list(value):
        raise _type_error(name, value, "one ratio or a pair (phase 0, phase 1) of numbers in [0, 1]")
    pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} = {value!r}: expected one ratio or a pair (phase 0, phase 1).")
    for phase, r in enumerate(pair):
        _check_ratio(f"{name}[{phase}]", r)
    return (float(pair[0]), float(pair[1]))


def _reject_unknown(where: str, d: Any, cls: type) -> None:
    if not isinstance(d, Mapping):
        raise _type_error(where, d, "a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; known fields: {sorted(known)}.")


def save_plan(plan: CachePlan, path: str | Path) -> None:
    """Write ``plan`` as human-readable JSON, atomically (temporary file, then rename)."""
    write_atomic(path, plan.to_json() + "\n")


def load_plan(path: str | Path) -> CachePlan:
    """Read and validate a plan written by `save_plan`; raises ``ValueError`` naming the bad field.

    A relative ``selector.path`` (predictor weights, static scores) is resolved against the plan
    file's directory, and the file's sha256 is checked here, so a plan with missing or tampered
    weights is rejected on load.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    try:
        plan = CachePlan.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    selector = plan.selector
    role = selector_class(selector.kind).file_role
    if role:
        weights = resolve_path(selector.path, path.parent)
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path}: selector.path = {selector.path!r}: {weights} does not exist (the plan's "
                f"{selector.kind} {role}; keep them next to the plan or re-run `tcpass calibrate`)."
            )
        check_sha256(weights, selector.sha256, f"{path}'s selector.sha256")
        plan = dataclasses.replace(plan, selector=dataclasses.replace(selector, path=str(weights.resolve())))
    return plan
