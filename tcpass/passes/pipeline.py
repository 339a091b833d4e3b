"""The pass pipeline: how one input signature's step graphs are built, as an ordered list of passes.

Every pass has one signature, ``pass_(build: Build) -> None``: it reads what the passes before it
left in ``build`` and adds its own results. `tcpass.graphs.build_step_graphs` traces the model into
``build.traced``, runs ``PIPELINE`` in order, and wraps the results in `tcpass.graphs.StepGraphs`.

1. ``clean``: the exported module -> a plain positional graph (`cleanup`).
2. ``locate_blocks``: the transformer blocks' spans and the plan's cached blocks.
3. ``skip_step``: with ``plan.skip``, the stack residual as a cache and the SKIP graph (`skip_step`).
4. ``full_step``: the FULL graph, returning every cache (`full_step`), executor form (`writeback`).
5. ``cached_steps``: one CACHED graph per distinct per-block K (`cached_step`), executor form with
   in-place cache updates (`reinplace`, `writeback`).

The caching semantics live in these passes and the token selector and forecaster they are given
(`tcpass.selectors`, `tcpass.forecasters`); executors only run the graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from tcpass.contracts import TensorSpec
from tcpass.forecasters import TokenForecaster
from tcpass.passes.cached_step import emit_cached_step
from tcpass.passes.cleanup import strip_export_artifacts
from tcpass.passes.full_step import emit_full_step
from tcpass.passes.layout import add_placeholders, finalize
from tcpass.passes.reinplace import reinplace_cache_updates
from tcpass.passes.skip_step import add_stack_residual, emit_skip_step
from tcpass.passes.writeback import write_caches_back
from tcpass.plan import CachePlan
from tcpass.selectors import TokenSelector
from tcpass.trace import BlockSpan, copy_graph_module, find_blocks


@dataclass
class StepGraph:
    """One step-specialized graph in two calling conventions.

    ``gm`` is functional, what ONNX export and FLOP counting see: ``gm(*model_inputs, *caches,
    *kept_indices)`` (a FULL graph takes the model inputs and the ``carried`` caches only) returns
    ``(sample, *updated_caches)``;
    a SKIP graph, ``gm(*model_inputs, *stack_residuals, weights)``, returns ``(sample,)``.
    ``exec_gm`` is what eager and compiled execution run, the same computation writing the caches
    into static buffers: ``exec_gm(*model_inputs, *cache_buffers, *kept_indices)`` returns
    ``(sample,)``; CACHED updates are in place (`tcpass.passes.reinplace`), the rest copied in
    (`tcpass.passes.writeback`).
    """

    gm: fx.GraphModule
    exec_gm: fx.GraphModule
    cache_specs: list[TensorSpec]
    index_specs: list[TensorSpec] = field(default_factory=list)
    keep: dict[int, int] = field(default_factory=dict)  # block -> K (CACHED graphs)
    role: str = "full"  # "full": writes caches | "cached": reads and writes them | "skip": reads them
    carried: list[TensorSpec] = field(default_factory=list)  # FULL: the caches ``gm`` reads (a forecaster's history)
    run: Callable | None = None  # executor (compiled exec_gm); None runs exec_gm eagerly

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        """``(*model_inputs, *cache_buffers, *kept_indices) -> sample``; updates the buffers in place."""
        return (self.exec_gm if self.run is None else self.run)(*args)[0]


@dataclass
class Build:
    """What the passes read and write while building one input signature's graphs."""

    model_name: str
    plan: CachePlan
    selector: TokenSelector
    block_prefixes: tuple[str, ...]
    timestep_input: str
    traced: fx.GraphModule  # the exported model; passes replace it with their rewritten copy
    input_names: list[str]  # the model inputs' names (`tcpass.trace.flatten_inputs`), in graph order
    example: list[torch.Tensor]  # the model inputs, in that order
    module: nn.Module | None = None  # what the selector's CACHED graphs call (in the model's dtype)
    forecaster: TokenForecaster | None = None  # what pruned tokens get (None: reuse)
    spans: list[BlockSpan] = field(default_factory=list)
    blocks: tuple[int, ...] = ()  # cached blocks
    stack_specs: list[TensorSpec] = field(default_factory=list)  # caches before the blocks' (stack.residual)
    skip: StepGraph | None = None
    full: StepGraph | None = None
    cached: dict[int, StepGraph] = field(default_factory=dict)  # phase -> graph (equal K: one shared graph)

    @property
    def device(self) -> torch.device:
        return self.example[0].device


Pass = Callable[[Build], None]


def clean(build: Build) -> None:
    strip_export_artifacts(build.traced, build.input_names)
    # values as FakeTensorProp gives them (the trace's own do not share storage with what they view), stamped:
    # `finalize` then re-propagates only what later passes change
    finalize(build.traced, build.example)


def locate_blocks(build: Build) -> None:
    build.spans = find_blocks(build.traced.graph, build.block_prefixes)
    if not build.spans:
        raise ValueError(
            f"no transformer blocks found under {build.block_prefixes} in the traced "
            f"{build.model_name}; check the adapter's block_prefixes."
        )
    build.blocks = build.plan.resolve_blocks(len(build.spans))


def skip_step(build: Build) -> None:
    if build.plan.skip is None:
        return
    level, history = build.plan.skip.level, build.plan.skip.history
    with_residual, residual = add_stack_residual(build.traced, build.block_prefixes, level)
    skip_gm, residuals, scale = emit_skip_step(build.traced, build.block_prefixes, level, residual, history)
    skip_gm = finalize(skip_gm, build.example + [s.example(build.device) for s in [*residuals, scale]])
    build.traced = with_residual  # FULL and CACHED graphs also write the stack residual
    build.stack_specs = [residual]
    build.skip = StepGraph(skip_gm, skip_gm, residuals, [scale], role="skip")


def full_step(build: Build) -> None:
    plan = build.plan
    gm, block_specs, carried = emit_full_step(
        build.traced,
        build.block_prefixes,
        build.blocks,
        plan.attention,
        build.selector,
        build.forecaster,
        build.timestep_input,
    )
    specs = build.stack_specs + block_specs
    gm = finalize(gm, build.example + [s.example(build.device) for s in carried])
    build.full = StepGraph(gm, write_caches_back(gm, specs), specs, carried=carried)


def cached_steps(build: Build) -> None:
    if not build.blocks:
        return
    specs = build.full.cache_specs
    caches = [s.example(build.device) for s in specs]
    # CACHED graphs take the stack residual buffer too (before the blocks' caches), and only write it
    with_stack_inputs = copy_graph_module(build.traced)
    add_placeholders(with_stack_inputs.graph, build.stack_specs)
    num_tokens = build.spans[0].num_tokens
    by_keep: dict[tuple, StepGraph] = {}
    for phase in (0, 1):
        keep = {b: build.plan.keep_tokens(b, phase, num_tokens) for b in build.blocks}
        key = tuple(keep.items())
        if key not in by_keep:
            gm, block_specs, index_specs = emit_cached_step(
                with_stack_inputs,
                build.block_prefixes,
                keep,
                build.plan.attention,
                build.selector,
                build.module,
                build.timestep_input,
                build.forecaster,
            )
            assert build.stack_specs + block_specs == specs, "FULL and CACHED graphs disagree on the cache layout"
            indices = [s.example(build.device) for s in index_specs]
            gm = finalize(gm, build.example + caches + indices)
            exec_gm, _ = reinplace_cache_updates(gm, [s.placeholder_name for s in specs])
            by_keep[key] = StepGraph(gm, write_caches_back(exec_gm, specs), specs, index_specs, keep, role="cached")
        build.cached[phase] = by_keep[key]


PIPELINE: tuple[Pass, ...] = (clean, locate_blocks, skip_step, full_step, cached_steps)


def run(build: Build) -> Build:
    """Run every pass of ``PIPELINE`` on ``build``, in order; returns it."""
    for pass_ in PIPELINE:
        pass_(build)
    return build
