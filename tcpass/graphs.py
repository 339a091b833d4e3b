"""Build the step-specialized graphs of a plan from one traced graph.

One FULL graph, one CACHED graph per distinct set of per-block K (phases with equal K share a
graph), and a SKIP graph when the plan skips steps. All of them share the model's parameters.
Executors (eager, torch.compile, ONNX) run these graphs; the caching semantics live only in the
passes that built them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import fx

from tcpass.adapters import ModelAdapter
from tcpass.passes.cached_step import emit_cached_step
from tcpass.passes.full_step import emit_full_step
from tcpass.passes.layout import TensorSpec, add_placeholders, copy_graph_module, finalize
from tcpass.passes.reinplace import reinplace_cache_updates
from tcpass.passes.skip_step import add_stack_residual, emit_skip_step
from tcpass.passes.writeback import write_caches_back
from tcpass.plan import CachePlan
from tcpass.trace import export_graph, find_blocks, flatten_inputs

# Dtypes a model may compute in: the graphs run the model's own arithmetic, with caches, kept-token
# indices' gathers and the Cache Predictor in the model's dtype (float64 is for numerics checks).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_dtypes(model: torch.nn.Module) -> None:
    """Refuse a model whose floating-point weights are in a dtype tcpass does not run (float8, ...)."""
    found = {p.dtype for p in model.parameters() if p.is_floating_point()}
    unsupported = sorted(str(d).removeprefix("torch.") for d in found if d not in SUPPORTED_DTYPES)
    if unsupported:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(
            f"{type(model).__name__} has {', '.join(unsupported)} weights; tcpass runs models in {names}. "
            "Cast it first, e.g. `model.to(torch.bfloat16)` (for float8 storage, load the model in "
            "bfloat16 instead)."
        )


@dataclass
class StepGraph:
    """One step-specialized graph in two calling conventions.

    ``gm`` is functional, what ONNX export and FLOP counting see: ``gm(*model_inputs, *caches,
    *kept_indices)`` (a FULL graph takes only the model inputs) returns ``(sample, *updated_caches)``;
    a SKIP graph, ``gm(*model_inputs, stack_residual, scale)``, returns ``(sample,)``.
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
    run: Callable | None = None  # executor (compiled exec_gm); None runs exec_gm eagerly

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        """``(*model_inputs, *cache_buffers, *kept_indices) -> sample``; updates the buffers in place."""
        return (self.exec_gm if self.run is None else self.run)(*args)[0]


@dataclass
class StepGraphs:
    """All graphs of a plan for one input signature (shapes, dtypes, device), and its cache buffers."""

    input_names: tuple[str, ...]
    input_specs: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    blocks: tuple[int, ...]  # cached blocks
    num_blocks: int
    num_tokens: int
    device: torch.device
    full: StepGraph
    cached: dict[int, StepGraph]  # phase -> graph (phases may share one)
    skip: StepGraph | None = None  # (*model_inputs, stack.residual, scale) -> sample; no cache written

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the caches between steps."""
        return sum(s.nbytes for s in self.full.cache_specs)

    @cached_property
    def caches(self) -> list[torch.Tensor]:
        """The static cache buffers, in layout order: allocated on first use and kept for good.

        Every step graph call writes into them, so their addresses never change. They are marked as
        static inputs for torch.compile: CUDA graphs may then update them in place.
        """
        return self.allocate_caches()

    def allocate_caches(self) -> list[torch.Tensor]:
        """A new set of cache buffers (zeros), marked as static inputs for torch.compile."""
        buffers = [s.example(self.device) for s in self.full.cache_specs]
        for buffer in buffers:
            torch._dynamo.mark_static_address(buffer)
        return buffers


def build_step_graphs(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    plan: CachePlan,
    inputs: dict,
    predictor: torch.nn.Module | None = None,
) -> StepGraphs:
    """Trace ``model`` on ``inputs`` (``forward`` keyword arguments) and build every step graph ``plan`` needs.

    The graphs take the tensors of ``flatten_inputs(inputs)`` positionally. ``predictor``: the dynamic
    Cache Predictor (selector kind ``dynamic``), emitted into the CACHED graphs.
    """
    check_dtypes(model)
    traced = export_graph(model, inputs, adapter.image_tokens(model, inputs))
    inputs = flatten_inputs(inputs)
    spans = find_blocks(traced.graph, adapter.block_prefixes)
    if not spans:
        raise ValueError(
            f"no transformer blocks found under {adapter.block_prefixes} in the traced "
            f"{type(model).__name__}; check the adapter's block_prefixes."
        )
    blocks = plan.resolve_blocks(len(spans))
    num_tokens = spans[0].num_tokens
    selector = plan.selector.kind
    example = list(inputs.values())
    device = example[0].device
    if predictor is not None:
        predictor = copy.deepcopy(predictor).to(device=device, dtype=model.dtype)

    skip = None
    stack_specs: list[TensorSpec] = []  # the stack residual comes first in the cache layout
    if plan.skip is not None:
        with_residual, residual_spec = add_stack_residual(traced, adapter.block_prefixes, plan.skip.level)
        skip_gm, scale_spec = emit_skip_step(traced, adapter.block_prefixes, plan.skip.level, residual_spec)
        traced = with_residual
        stack_specs = [residual_spec]
        skip_inputs = example + [residual_spec.example(device), scale_spec.example(device)]
        skip_gm = finalize(skip_gm, skip_inputs)
        skip = StepGraph(skip_gm, skip_gm, [residual_spec], [scale_spec], role="skip")

    full_gm, block_specs = emit_full_step(traced, adapter.block_prefixes, blocks, plan.attention, selector)
    cache_specs = stack_specs + block_specs
    full_gm = finalize(full_gm, example)
    full = StepGraph(full_gm, write_caches_back(full_gm, cache_specs), cache_specs)
    caches = [s.example(device) for s in cache_specs]

    # CACHED graphs take the stack residual buffer too (before the blocks' caches), and only write it
    with_stack_inputs = copy_graph_module(traced)
    add_placeholders(with_stack_inputs.graph, stack_specs)
    cached: dict[int, StepGraph] = {}
    by_keep: dict[tuple, StepGraph] = {}
    for phase in (0, 1):
        keep = {b: plan.keep_tokens(b, phase, num_tokens) for b in blocks}
        key = tuple(keep.items())
        if key not in by_keep and blocks:
            gm, specs, index_specs = emit_cached_step(
                with_stack_inputs,
                adapter.block_prefixes,
                keep,
                plan.attention,
                selector,
                predictor,
                adapter.timestep_input,
            )
            assert stack_specs + specs == cache_specs, "FULL and CACHED graphs disagree on the cache layout"
            specs = cache_specs
            indices = [s.example(device) for s in index_specs]
            gm = finalize(gm, example + caches + indices)
            exec_gm, _ = reinplace_cache_updates(gm, [s.placeholder_name for s in specs])
            by_keep[key] = StepGraph(gm, write_caches_back(exec_gm, specs), specs, index_specs, keep, role="cached")
        if blocks:
            cached[phase] = by_keep[key]
    return StepGraphs(
        input_names=tuple(inputs),
        input_specs=tuple((tuple(t.shape), t.dtype) for t in example),
        blocks=blocks,
        num_blocks=len(spans),
        num_tokens=num_tokens,
        device=device,
        full=full,
        cached=cached,
        skip=skip,
    )
