"""Build the step-specialized graphs of a plan from one traced graph.

One FULL graph, one CACHED graph per distinct set of per-block K (phases with equal K share a
graph), and a SKIP graph when the plan skips steps. All of them share the model's parameters.
Executors (eager, torch.compile, ONNX) run these graphs; the caching semantics live only in the
passes that built them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import torch

from tcpass.adapters import ModelAdapter
from tcpass.contracts import TensorSpec
from tcpass.forecasters import make_forecaster
from tcpass.passes import pipeline
from tcpass.passes.pipeline import StepGraph
from tcpass.plan import CachePlan
from tcpass.selectors import TokenSelector
from tcpass.trace import constant_inputs, export_graph, flatten_inputs

__all__ = ["StepGraph", "StepGraphs", "build_step_graphs", "check_dtypes"]

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
    skip: StepGraph | None = None  # (*model_inputs, *stack residuals, weights) -> sample; no cache written
    constants: tuple[tuple[str, bool | int | float], ...] = ()  # Python numbers baked in (`trace.constant_inputs`)

    @property
    def cache_specs(self) -> list[TensorSpec]:
        """Every buffer kept between steps: the FULL graph's caches, then the older stack residuals a
        forecasting SKIP graph reads (``stack.residual.1``..)."""
        history = self.skip.cache_specs[1:] if self.skip is not None else []
        return [*self.full.cache_specs, *history]

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the caches between steps."""
        return sum(s.nbytes for s in self.cache_specs)

    def step_caches(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """The buffers a FULL or CACHED graph takes (of ``buffers``, laid out as `cache_specs`)."""
        return buffers[: len(self.full.cache_specs)]

    def skip_caches(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """The stack residuals the SKIP graph takes, newest first."""
        return [buffers[0], *buffers[len(self.full.cache_specs) :]]

    def shift_history(self, buffers: list[torch.Tensor], moves: tuple[tuple[str, str], ...]) -> None:
        """Before a FULL or CACHED call: apply the step controller's ``moves`` (`tcpass.controller.Decision`),
        each remembered stack residual one place older; the call then writes the newest.

        The older residuals are only read by the SKIP graph, so they move by reference: the oldest
        buffer takes a copy of the newest and becomes ``stack.residual.1`` (one copy per call).
        """
        if not moves:
            return
        names = [s.name for s in self.skip.cache_specs]  # newest first
        n = len(self.full.cache_specs)
        slots = {name: (0 if k == 0 else n + k - 1) for k, name in enumerate(names)}
        before = {name: buffers[i] for name, i in slots.items()}
        free = before[moves[0][0]]  # the oldest is forgotten: its buffer is reused
        for dst, src in moves:
            if src == names[0]:  # the call overwrites the newest in place: keep a copy
                buffers[slots[dst]] = free.copy_(before[src])
            else:
                buffers[slots[dst]] = before[src]

    def forget_history(self, buffers: list[torch.Tensor]) -> None:
        """A generation starts: zero the caches the FULL graph reads (a forecaster's history), so that no
        history reaches across generations (`tcpass.forecasters.base`)."""
        carried = {s.name for s in self.full.carried}
        for spec, buffer in zip(self.full.cache_specs, buffers, strict=False):
            if spec.name in carried:
                buffer.zero_()

    @cached_property
    def caches(self) -> list[torch.Tensor]:
        """The static cache buffers, in layout order: allocated on first use and kept for good.

        Every step graph call writes into them, so their addresses never change. They are marked as
        static inputs for torch.compile: CUDA graphs may then update them in place.
        """
        return self.allocate_caches()

    def allocate_caches(self) -> list[torch.Tensor]:
        """A new set of cache buffers (zeros); those the graphs write are marked as static inputs for
        torch.compile (the older stack residuals move between calls, see `shift_history`)."""
        buffers = [s.example(self.device) for s in self.cache_specs]
        for buffer in buffers[: len(self.full.cache_specs)]:  # written in place by the graphs
            torch._dynamo.mark_static_address(buffer)
        return buffers


def build_step_graphs(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    plan: CachePlan,
    inputs: dict,
    selector: TokenSelector,
    module: torch.nn.Module | None = None,
) -> StepGraphs:
    """Trace ``model`` on ``inputs`` (``forward`` keyword arguments) and build every step graph ``plan`` needs.

    The graphs take the tensors of ``flatten_inputs(inputs)`` positionally. ``selector``: the plan's
    token selector (`tcpass.selectors.make_selector(plan.selector)`); ``module``: the module its CACHED
    graphs call (the dynamic predictor), cast here to the model's device and dtype.
    """
    check_dtypes(model)
    traced = export_graph(model, inputs, adapter.image_tokens(model, inputs))
    flat = flatten_inputs(inputs)
    example = list(flat.values())
    if module is not None:
        module = copy.deepcopy(module).to(device=example[0].device, dtype=model.dtype)
    build = pipeline.run(
        pipeline.Build(
            model_name=type(model).__name__,
            plan=plan,
            selector=selector,
            block_prefixes=adapter.block_prefixes,
            timestep_input=adapter.timestep_input,
            traced=traced,
            input_names=list(flat),
            example=example,
            module=module,
            forecaster=make_forecaster(plan.forecast),
        )
    )
    return StepGraphs(
        input_names=tuple(flat),
        input_specs=tuple((tuple(t.shape), t.dtype) for t in example),
        constants=constant_inputs(inputs),
        blocks=build.blocks,
        num_blocks=len(build.spans),
        num_tokens=build.spans[0].num_tokens,
        device=build.device,
        full=build.full,
        cached=build.cached,
        skip=build.skip,
    )
