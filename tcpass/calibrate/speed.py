"""The speed model of calibration: per-call seconds measured on this machine (FULL, CACHED, SKIP and
uncached calls, checked for plausibility) and `predict_speedup`, the one function that prices a plan
from them. (`tcpass.timing` is another thing: the allocator and thread settings of timed runs.)"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tcpass.adapters import adapter_for
from tcpass.plan import CachePlan, ForecastSpec, forecast_name
from tcpass.schedule import StepKind, simulate
from tcpass.trace import flatten_inputs

logger = logging.getLogger("tcpass")


# 4. Timing model and schedule search ------------------------------------------------------------
@dataclass
class StepTimes:
    """Seconds per model call on this machine at one batch size."""

    eager: float  # the uncached model
    full: float  # tcpass FULL graph
    cached: dict[float, float]  # keep ratio -> CACHED graph with every candidate block cached
    num_blocks: int

    def cached_time(self, n_blocks: int, ratio: float) -> float:
        """CACHED call with ``n_blocks`` of ``num_blocks`` cached at ``ratio`` (linear in blocks)."""
        return self.full + n_blocks / self.num_blocks * (self.cached[ratio] - self.full)

    def seconds(self, forecast: ForecastSpec | None = None) -> dict[str, float]:
        """These times under the names `predict_speedup` reads for plans whose pruned tokens get ``forecast``
        (the graphs these times were measured on; `token_key`). The token graphs' FULL is ``full tokens``."""
        cached = {token_key(f"cached {k:g}", forecast): v for k, v in self.cached.items()}
        return {
            "eager": self.eager,
            "full": self.full,
            token_key("full tokens", forecast): self.full,
            "num_blocks": self.num_blocks,
            **cached,
        }

    def speedup(self, plan: CachePlan, timesteps: list[float]) -> float:
        """`predict_speedup` of ``plan`` over ``timesteps`` with these times (measured on graphs that
        forecast as ``plan`` does)."""
        return predict_speedup(plan, timesteps, self.seconds(plan.forecast))


def token_key(name: str, forecast: ForecastSpec | None) -> str:
    """The ``seconds`` key of a token-caching graph (``full tokens``, ``cached 0.25``) whose pruned tokens get
    ``forecast``: ``name`` for reuse, else ``name`` and the forecast's name (``cached 0.25 anchored:1``), since
    a forecast's history caches cost time of their own."""
    fc = forecast_name(forecast)
    return name if fc == "reuse" else f"{name} {fc}"


def predict_speedup(
    plan: CachePlan, timesteps: list[float], seconds: dict[str, float], full_compute_calls: int | None = None
) -> float:
    """The one speed model: seconds of ``full_compute_calls`` (default ``len(timesteps)``) uncached calls
    over the seconds of ``plan``'s calls at ``timesteps`` (`tcpass.schedule.simulate`), from per-call seconds.

    ``seconds``: ``eager`` (the uncached model); ``full`` (the FULL graph of a plan that token-caches
    nothing) and ``skip_<level>`` (a SKIP call), from `tcpass.calibrate.steps.measure_call_seconds`; a
    plan that token-caches also needs ``full tokens`` (its FULL graph), ``cached <keep>`` (a CACHED call
    with every block cached) per keep ratio it uses and ``num_blocks``: caching fewer blocks saves
    proportionally less (`StepTimes`, `tcpass.calibrate.steps.measure_token_seconds`); a plan whose pruned
    tokens are forecast reads these under `token_key`'s names.
    """
    full_tokens = token_key("full tokens", plan.forecast)
    total = 0.0
    for step in simulate(plan.schedule, timesteps, plan.skip):
        if step.kind is StepKind.SKIP:
            total += seconds[f"skip_{plan.skip.level}"]
        elif plan.blocks == ():  # nothing token-cached: a CACHED call computes everything
            total += seconds["full"]
        elif step.kind is StepKind.FULL:
            total += seconds[full_tokens]
        else:  # CACHED: every block cached costs "cached <keep>"; fewer blocks, linearly less saving
            fraction = 1.0 if plan.blocks == "all" else len(plan.blocks) / seconds["num_blocks"]
            cached = seconds[token_key(f"cached {plan.keep_ratio[step.phase]:g}", plan.forecast)]
            total += seconds[full_tokens] + fraction * (cached - seconds[full_tokens])
    return seconds["eager"] * (full_compute_calls or len(timesteps)) / total


def best_seconds(fn: Callable, reps: int) -> float:
    """Fastest of ``reps`` timed calls of ``fn`` (seconds), after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def measure_step_times(
    model: nn.Module,
    ratios: tuple[float, ...],
    plan: CachePlan,
    batch: int,
    plan_dir: Path | None = None,
    reps: int = 5,
    progress: bool = True,
) -> StepTimes:
    """Time the uncached model and ``plan``'s FULL/CACHED graphs (every block cached) per keep ratio."""
    from tcpass.torch_runtime import transform

    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, batch)
    values = list(flatten_inputs(inputs).values())  # the graphs take the flattened tensors
    eager = best_seconds(lambda: model(**inputs), reps)
    cached, full = {}, math.inf
    for r in tqdm(ratios, desc="timing step graphs", disable=not progress, leave=False):
        tm = transform(
            model,
            dataclasses.replace(plan, blocks="all", keep_ratio=r, block_keep_ratio={}),
            example_inputs=inputs,
            plan_dir=plan_dir,
        )
        graphs = tm.step_graphs()
        caches = graphs.caches  # the runtime's buffers: every call updates them in place, as in sampling
        full = min(full, best_seconds(lambda graphs=graphs, caches=caches: graphs.full(*values, *caches), reps))
        g = graphs.cached[0]
        indices = [s.example(values[0].device) for s in g.index_specs]
        cached[r] = best_seconds(lambda g=g, caches=caches, indices=indices: g(*values, *caches, *indices), reps)
    return StepTimes(eager, full, cached, adapter.fingerprint(model).num_blocks)


def implausible(times: StepTimes, noise: float = 0.15) -> list[str]:
    """What is wrong with ``times`` if they cannot be right (empty list: plausible).

    The FULL graph does the uncached model's work plus cache writes, so it cannot be much faster
    than it, and a CACHED graph recomputing more tokens cannot be much cheaper than one recomputing
    fewer. (A CACHED call slower than FULL is not flagged: on tiny models gather/scatter can cost more.)
    Other jobs on the machine break these (measured: FULL 23.7 ms vs eager 35.9 ms under load).
    """
    problems = []
    if times.full < (1 - noise) * times.eager:
        problems.append(f"FULL {times.full * 1e3:.1f} ms is faster than the uncached model {times.eager * 1e3:.1f} ms")
    ordered = [times.cached[r] for r in sorted(times.cached)]
    if any(b < (1 - noise) * a for a, b in zip(ordered, ordered[1:], strict=False)):
        problems.append("CACHED times fall as the keep ratio rises: " + ", ".join(f"{t * 1e3:.1f}" for t in ordered))
    return problems


def measure_plausible_step_times(*args, attempts: int = 3, **kwargs) -> tuple[StepTimes, list[str]]:
    """`measure_step_times`, re-measured (up to ``attempts`` times) while `implausible`; returns the times
    and the problems left (empty when plausible), which the caller reports."""
    for attempt in range(attempts):
        times = measure_step_times(*args, **kwargs)
        problems = implausible(times)
        if not problems:
            return times, []
        logger.warning(
            "tcpass calibrate: implausible step times (%s); re-measuring (%d/%d)",
            "; ".join(problems),
            attempt + 1,
            attempts,
        )
    return times, problems
