"""FLOP counts of the graphs a generation actually runs, for FLOP-ideal speedups.

Counts matrix multiplies, convolutions and attention (``torch.utils.flop_counter``; CPU fused
attention is added here, torch counts only the GPU kernels). Gather, scatter and elementwise ops
are not counted: measured/ideal then shows what they, and smaller matmuls, cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tcpass.schedule import StepKind, simulate
from tcpass.torch_runtime import TokenCacheTransformer
from tcpass.trace import flatten_inputs


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def count_flops(fn, *args) -> int:
    """FLOPs of one call ``fn(*args)`` (under no_grad)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        fn(*args)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class GenerationFlops:
    """FLOPs of one whole generation, uncached vs transformed."""

    baseline: int
    transformed: int
    full_step: int
    cached_step: dict[int, int]  # phase -> FLOPs of one CACHED call
    num_full: int
    num_cached: int
    skip_step: int = 0  # FLOPs of one SKIP call (embedding and output layers, or none)
    num_skip: int = 0

    @property
    def ideal_speedup(self) -> float:
        return self.baseline / self.transformed


def generation_flops(
    model: TokenCacheTransformer, inputs: dict[str, torch.Tensor], timesteps: list[float]
) -> GenerationFlops:
    """Count the FLOPs ``model`` spends over a generation calling it at ``timesteps`` with ``inputs``' shapes.

    ``timesteps`` are on the schedule's 0..1000 scale (what `TPRRSchedule.boundary_timestep` uses).
    """
    graphs = model.step_graphs(inputs)
    values = list(flatten_inputs(inputs).values())
    device = values[0].device
    full = count_flops(graphs.full.gm, *values, *(s.example(device) for s in graphs.full.carried))
    caches = [s.example(device) for s in graphs.full.cache_specs]
    cached = {}
    for phase, g in graphs.cached.items():
        indices = [s.example(device) for s in g.index_specs]
        cached[phase] = count_flops(g.gm, *values, *caches, *indices)
    skip = 0
    if graphs.skip is not None:
        skip_inputs = [s.example(device) for s in graphs.skip.cache_specs + graphs.skip.index_specs]
        skip = count_flops(graphs.skip.gm, *values, *skip_inputs)
    kinds = []
    for step in simulate(model.plan.schedule, timesteps, model.plan.skip):
        if step.kind is StepKind.CACHED and not graphs.blocks:  # no cached blocks: computed calls are FULL
            kinds.append((StepKind.FULL, step.phase))
        else:
            kinds.append((step.kind, step.phase))
    cost = {StepKind.FULL: lambda _: full, StepKind.CACHED: cached.__getitem__, StepKind.SKIP: lambda _: skip}
    transformed = sum(cost[kind](phase) for kind, phase in kinds)
    count = {kind: sum(k is kind for k, _ in kinds) for kind in StepKind}
    return GenerationFlops(
        full * len(kinds),
        transformed,
        full,
        cached,
        count[StepKind.FULL],
        count[StepKind.CACHED],
        skip,
        count[StepKind.SKIP],
    )
