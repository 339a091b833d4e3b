"""The module users call: step-specialized graphs, their caches, and the TPRR schedule.

`TokenCacheTransformer` keeps the original ``forward`` signature and the attributes pipelines read
(``config``, ``dtype``, ``device``), so it replaces ``pipe.transformer`` as is. Per call it reads
the timestep (one scalar read per step, never per token), asks the schedule for the step kind, and
calls the FULL or the CACHED graph. Caches live in static buffers, one set per input signature
(`StepGraphs.caches`), allocated on the signature's first call and kept: graphs write them in place,
so their addresses never change (what CUDA graphs need) and a new generation starts with a FULL step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import ModelMixin  # also how diffusers finds our loader (model_index.json: "tcpass.runtime")
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from tcpass.adapters import ModelAdapter, adapter_for, quiet_load_kwargs
from tcpass.compile import compile_step_graphs
from tcpass.contracts import residual_history
from tcpass.controller import StepController
from tcpass.files import resolve_path, sha256_of, write_atomic
from tcpass.graphs import StepGraphs, build_step_graphs, check_dtypes
from tcpass.plan import CachePlan, load_plan
from tcpass.policies import TokenPolicy, make_policy
from tcpass.schedule import Step, StepKind, check_timestep
from tcpass.trace import flatten_inputs

logger = logging.getLogger("tcpass")

Signature = tuple[Any, ...]


class _TraceLock:
    """Tracing is exclusive, running graphs is shared: across every transformed model in this process.

    ``torch.export`` is not thread-safe, and while it traces a model it temporarily swaps that
    model's parameters; graphs of another transformed model sharing those weights must not run
    meanwhile (measured: outputs off by 0.57 without this). Waiting tracers go first.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._tracing = False
        self._waiting = 0

    @contextlib.contextmanager
    def running(self):
        with self._cond:
            while self._tracing or self._waiting:
                self._cond.wait()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if not self._running:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def tracing(self):
        with self._cond:
            self._waiting += 1
            while self._tracing or self._running:
                self._cond.wait()
            self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


_TRACE_LOCK = _TraceLock()

SAVED_MANIFEST = "tcpass.json"  # written last by save_pretrained: a directory without it is not a saved transform
SAVED_PLAN = "tcpass_plan.json"
SAVED_FORMAT = 1

# ModelMixin methods that change the wrapped model's attention or layers. The graphs were traced from
# the model as it was, so such a change would not reach them: refuse instead of silently ignoring it.
_TRACED_AWAY = (
    "set_use_npu_flash_attention",
    "enable_npu_flash_attention",
    "enable_xla_flash_attention",
    "set_use_memory_efficient_attention_xformers",
    "enable_xformers_memory_efficient_attention",
    "enable_layerwise_casting",
    "enable_group_offload",
    "set_attention_backend",
    "compile_repeated_blocks",
    "enable_parallelism",
    "fuse_qkv_projections",
    "set_attn_processor",
    "set_default_attn_processor",
)


def _traced_away(name: str):
    def refuse(self, *args, **kwargs):
        raise NotImplementedError(
            f"TokenCacheTransformer.{name}: tcpass traced its graphs from the model as it was, so this change "
            f"would not reach them. Call `{name}` on the original model, then `tcpass.transform` it."
        )

    refuse.__name__ = name
    refuse.__doc__ = f"Not supported after `tcpass.transform`: call `{name}` on the original model first."
    return refuse


class TokenCacheTransformer(ModelMixin):
    """A diffusion transformer running TokenCache. Build it with `tcpass.transform`.

    Inference only: calls run under ``torch.no_grad()``.

    The wrapped model is registered as ``self.transformer`` and shared, never modified: its
    parameters are the ones the graphs compute with. Graphs are built per input signature (shapes,
    dtypes, device) on first use; a new signature or a rising timestep starts a new generation.

    It is a diffusers ``ModelMixin``, so pipelines save, load and move it like their own models:
    ``pipe.save_pretrained(d)`` writes the original model in diffusers' format plus the plan
    (`save_pretrained`), and ``DiffusionPipeline.from_pretrained(d)`` gives the transformed model
    back (`from_pretrained`) once ``tcpass.runtime`` is imported (``from tcpass import transform``).
    ``.to(device/dtype)`` re-traces on the next call. Methods that would change the wrapped
    model's attention or layers after tracing (``enable_xformers_memory_efficient_attention``,
    ``set_attention_backend``, ``enable_layerwise_casting``, ...) raise ``NotImplementedError``.

    Attributes:
        plan: the `CachePlan` in force.
        step_counts: how many FULL, CACHED and SKIP calls ran since construction (``StepKind -> int``).
        last_step: the `Step` the latest call ran.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: CachePlan,
        adapter: ModelAdapter,
        graphs: StepGraphs,
        plan_dir: Path | None,
        policy: TokenPolicy,
        compile_options: dict | None = None,
        predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.transformer = model
        self.predictor = predictor  # the module the policy's CACHED graphs call (dynamic), or None
        self.plan = plan
        self.policy = policy  # the plan's token policy (`tcpass.policies`), its files loaded
        self.model_adapter = adapter  # the model family's `tcpass.adapters.ModelAdapter`
        self._compile_options = compile_options
        self._graphs: dict[Signature, StepGraphs] = {}
        self._add_graphs(self._signature_of(graphs), graphs)
        self._plan_dir = plan_dir
        self._forward_signature = inspect.signature(model.forward)
        history = residual_history(plan.skip.history) if plan.skip is not None else []
        self._controller = StepController(plan.schedule, plan.skip, "TokenCacheTransformer", history)
        self._context_buffers: dict[tuple[str, Signature], list[torch.Tensor]] = {}

    @property
    def step_counts(self) -> Counter[StepKind]:
        """How many FULL, CACHED and SKIP calls ran since construction."""
        return self._controller.step_counts

    @property
    def last_step(self) -> Step | None:
        """The `Step` the latest call ran."""
        return self._controller.last_step

    # Attributes pipelines read ------------------------------------------------------------------
    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def enable_gradient_checkpointing(self, *args, **kwargs):
        raise NotImplementedError("TokenCacheTransformer is inference-only: gradient checkpointing does not apply.")

    # Save and load ------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Save the original model in diffusers' own format, plus the plan next to it.

        ``save_directory`` gets what ``self.transformer.save_pretrained`` writes (``config.json`` and
        safetensors weights: any diffusers install loads them with the original class), then
        ``tcpass_plan.json`` (and the selector's weights file, if the plan has one, with its sha256),
        then ``tcpass.json`` last, which marks the directory as a saved transform. `from_pretrained`
        reads it back. Safetensors only: ``safe_serialization=False`` is refused (no pickle).
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False: tcpass saves safetensors only (no pickle); leave it True.")
        if push_to_hub:
            raise ValueError("push_to_hub=True is not supported: save locally, then upload the directory.")
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_directory = {str(save_directory)!r} is a file; pass a directory.")
        self.transformer.save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            safe_serialization=True,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        if not is_main_process:
            return
        plan = self.plan
        if plan.selector.path:
            source = resolve_path(plan.selector.path, self._plan_dir)
            name = "tcpass_selector" + source.suffix
            write_atomic(save_directory / name, source.read_bytes())
            selector = dataclasses.replace(plan.selector, path=name, sha256=sha256_of(save_directory / name))
            plan = dataclasses.replace(plan, selector=selector)
        write_atomic(save_directory / SAVED_PLAN, plan.to_json() + "\n")
        backend = None if self._compile_options is None else self._compile_options["backend"]
        mode = None if self._compile_options is None else self._compile_options["mode"]
        manifest = {
            "format": SAVED_FORMAT,
            "model_class": type(self.transformer).__name__,
            "plan": SAVED_PLAN,
            "backend": backend,
            "compile_mode": mode,
        }
        write_atomic(save_directory / SAVED_MANIFEST, json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **kwargs
    ) -> TokenCacheTransformer:
        """Load a transformed model written by `save_pretrained` (a local directory).

        The original model is loaded with its own diffusers class and every loading keyword
        (``torch_dtype``, ``variant``, ``device_map``, ...), then transformed with the saved plan
        (its selector file checked by sha256) and the saved ``backend``/``compile_mode``.
        Pass ``backend=...``/``compile_mode=...`` to override them.

        Raises:
            FileNotFoundError: the directory is not a saved transform (no ``tcpass.json``).
            ValueError: the manifest or the plan is invalid, naming the field.
        """
        path = Path(pretrained_model_name_or_path)
        if subfolder:
            path = path / subfolder
        manifest_path = path / SAVED_MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{path} is not a transformer saved by tcpass (no {SAVED_MANIFEST}); load it with its diffusers "
                "class and call tcpass.transform, or save it with TokenCacheTransformer.save_pretrained."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest_path}: not valid JSON ({e}).") from e
        if not isinstance(manifest, dict) or manifest.get("format") != SAVED_FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else manifest
            raise ValueError(f"{manifest_path}: format = {got!r}; this tcpass reads format {SAVED_FORMAT}.")
        model_cls = getattr(diffusers, str(manifest.get("model_class")), None)
        if not (isinstance(model_cls, type) and issubclass(model_cls, ModelMixin)):
            raise ValueError(
                f"{manifest_path}: model_class = {manifest.get('model_class')!r} is not a diffusers model class."
            )
        backend = kwargs.pop("backend", manifest.get("backend"))
        compile_mode = kwargs.pop("compile_mode", manifest.get("compile_mode"))
        plan = load_plan(path / str(manifest.get("plan", SAVED_PLAN)))
        model = model_cls.from_pretrained(path, **{**quiet_load_kwargs(), **kwargs})
        return transform(model, plan, plan_dir=path, backend=backend, compile_mode=compile_mode)

    def _apply(self, fn, recurse: bool = True):
        # Graphs (and their cache buffers) bake in device-specific constants: rebuild them after .to()/.half().
        self._graphs.clear()
        self._context_buffers.clear()
        self.reset()
        return super()._apply(fn, recurse)

    # State --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop the caches: the next call is FULL and starts a new generation.

        Not needed between generations that restart the timestep sequence (detected
        automatically); useful when a new generation starts at a lower timestep (img2img).
        """
        self._controller.reset()
        self.policy.reset()

    @property
    def _active(self) -> Signature | None:
        """The input signature of the current cache context's caches (None before its first call)."""
        return self._controller.stream.signature

    @property
    def cache_bytes(self) -> int:
        """Bytes of the cache buffers of the input signature in use (0 before the first call)."""
        return self._graphs[self._active].cache_bytes if self._active else 0

    def step_graphs(self, inputs: dict | None = None) -> StepGraphs:
        """The graphs for ``inputs`` (default: the signature used most recently)."""
        if inputs is None:
            return self._graphs[self._active] if self._active else next(iter(self._graphs.values()))
        return self._graphs_for(self._signature(flatten_inputs(inputs)), inputs)

    def _graphs_for(self, key: Signature, inputs: dict) -> StepGraphs:
        if key not in self._graphs:
            logger.info("tcpass: tracing %s for a new input signature", type(self.transformer).__name__)
            with _TRACE_LOCK.tracing():
                graphs = build_step_graphs(
                    self.transformer, self.model_adapter, self.plan, inputs, self.policy, self.predictor
                )
            self._add_graphs(key, graphs)
        return self._graphs[key]

    def _add_graphs(self, key: Signature, graphs: StepGraphs) -> None:
        if self._compile_options is not None:
            compile_step_graphs(graphs, **self._compile_options)
        self._graphs[key] = graphs

    # Calling ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Calls inside use their own caches and schedule state, kept under ``name``.

        Pipelines that call the transformer twice per step with different conditioning (Flux with
        ``true_cfg_scale``: ``cond`` then ``uncond``) keep the two streams apart this way, like
        diffusers' cache hooks. Batched classifier-free guidance (one call, rows independent) needs
        no context.
        """
        with self._controller.cache_context(name):
            yield

    def _cache_buffers(self, key: Signature, graphs: StepGraphs) -> list[torch.Tensor]:
        """The cache buffers of the current context: the graphs' own, or a set kept per named context."""
        context = self._controller.context
        if context is None:
            return graphs.caches
        if (context, key) not in self._context_buffers:
            self._context_buffers[context, key] = graphs.allocate_caches()
        return self._context_buffers[context, key]

    def forward(self, *args, return_dict: bool = True, **kwargs):
        """The wrapped model's ``forward``, running the step graph the schedule picks for this timestep.

        Threads: a transformed model holds one generation's caches and step state, so it refuses
        concurrent use (``RuntimeError``): a call while another thread is inside ``forward``, or a
        call from another thread in the middle of that thread's generation. Use one transformed
        model per thread (``tcpass.transform`` again shares the weights), or serialize whole
        generations.
        """
        with self._controller.guard.call() as me:
            return self._forward(me, args, kwargs, return_dict)

    def _forward(self, me: int, args: tuple, kwargs: dict, return_dict: bool):
        inputs = self._bind(args, kwargs)
        flat = flatten_inputs(inputs)
        key = self._signature(flat)
        # one scalar read per step, on the schedule's 0..1000 scale; checked before any state changes
        timestep = float(flat[self.model_adapter.timestep_input].reshape(-1)[0]) * self.model_adapter.timestep_scale
        check_timestep(timestep)
        graphs = self._graphs_for(key, inputs)
        decision = self._controller.decide(me, timestep, key, can_cache=bool(graphs.blocks))
        if decision.fresh:
            self.policy.reset()
        values = list(flat.values())
        # Inference only: caches must not carry autograd history from step to step.
        with torch.no_grad(), _TRACE_LOCK.running():
            buffers = self._cache_buffers(key, graphs)
            if decision.fresh:
                graphs.forget_history(buffers)
            if decision.kind is StepKind.SKIP:
                residuals = graphs.skip_caches(buffers)
                weights = torch.tensor(decision.step.weights, dtype=residuals[0].dtype, device=residuals[0].device)
                sample = graphs.skip(*values, *residuals, weights)
            else:
                graphs.shift_history(buffers, decision.history_moves)
                if decision.kind is StepKind.FULL:
                    sample = graphs.full(*values, *graphs.step_caches(buffers))
                else:
                    graph = graphs.cached[decision.step.phase]
                    device = values[0].device
                    indices = [
                        torch.from_numpy(self.policy.indices(s.block, s.shape, graphs.num_tokens, timestep)).to(device)
                        for s in graph.index_specs
                    ]
                    sample = graph(*values, *graphs.step_caches(buffers), *indices)
        self._controller.finished(decision)
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        try:
            bound = self._forward_signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.transformer).__name__}.forward: {e}") from e
        names = self.model_adapter.input_names
        extra = {k: v for k, v in bound.arguments.items() if k not in names and v not in (None, {})}
        if extra:
            raise ValueError(
                f"tcpass does not support the argument(s) {sorted(extra)} of "
                f"{type(self.transformer).__name__}.forward; pass None or use the original model."
            )
        missing = [n for n in self.model_adapter.required_inputs if bound.arguments.get(n) is None]
        if missing:
            raise ValueError(f"{type(self.transformer).__name__}.forward needs {missing} under tcpass.")
        inputs = {n: bound.arguments[n] for n in names if bound.arguments.get(n) is not None}
        batch = inputs[names[0]].shape[0]
        t = inputs[self.model_adapter.timestep_input]
        t = torch.as_tensor(t, device=inputs[names[0]].device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() == 1 and t.shape[0] == 1 and batch > 1:
            t = t.expand(batch)
        inputs[self.model_adapter.timestep_input] = t
        return inputs

    @staticmethod
    def _signature(inputs: dict[str, torch.Tensor]) -> Signature:
        return tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in inputs.items())

    @staticmethod
    def _signature_of(graphs: StepGraphs) -> Signature:
        return tuple(
            (n, shape, dtype, graphs.device)
            for n, (shape, dtype) in zip(graphs.input_names, graphs.input_specs, strict=True)
        )


for _name in _TRACED_AWAY:
    setattr(TokenCacheTransformer, _name, _traced_away(_name))
del _name


def transform(
    model: nn.Module,
    plan: CachePlan,
    *,
    example_inputs: dict[str, torch.Tensor] | None = None,
    plan_dir: str | Path | None = None,
    backend: str | None = None,
    compile_mode: str | None = None,
) -> TokenCacheTransformer:
    """Apply TokenCache to a diffusers transformer; returns a drop-in replacement module.

    Args:
        model: a supported diffusers transformer (see `tcpass.adapters.ADAPTERS`). Never modified.
        plan: what to cache and when (`CachePlan`).
        example_inputs: inputs to trace with (``{name: tensor}``, names from the adapter's
            ``input_names``); default: built from the model's config with batch 2 (one image with
            classifier-free guidance). Other shapes are traced on first use.
        plan_dir: directory that relative files in the plan (static scores) are resolved against.
        backend: ``None`` runs the graphs eagerly; a ``torch.compile`` backend (``"inductor"``)
            compiles each step graph once (``fullgraph=True``, static shapes).
        compile_mode: ``torch.compile`` mode, e.g. ``"max-autotune-no-cudagraphs"``, or ``"reduce-overhead"``
            (CUDA graphs, on GPU; the cache buffers are static inputs).

    Raises:
        TypeError: the model family or its dtype (float8, ...) is not supported, or ``plan`` is not a `CachePlan`.
        ValueError: the plan does not fit the model (block index, fingerprint), naming the field.
    """
    if isinstance(model, TokenCacheTransformer):
        raise TypeError(
            "model is already transformed by tcpass; pass model.transformer (the original) to apply another plan."
        )
    adapter = adapter_for(model)
    check_dtypes(model)
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan must be a tcpass.CachePlan, got {type(plan).__name__}.")
    fingerprint = adapter.fingerprint(model)
    if plan.model is not None and plan.model != fingerprint:
        raise ValueError(
            f"plan.model = {plan.model} was made for another model; this one is {fingerprint}. "
            "Calibrate a plan for this model or set plan.model = None."
        )
    plan.resolve_blocks(fingerprint.num_blocks)
    plan_dir = Path(plan_dir) if plan_dir else None
    policy = make_policy(plan.selector, plan_dir)  # loads and checks the policy's file, if any
    predictor = policy.module(fingerprint.hidden_size, fingerprint.num_blocks)
    if example_inputs is None:
        example_inputs = adapter.example_inputs(model, 2)
    unknown = sorted(set(example_inputs) - set(adapter.input_names))
    if unknown:
        raise ValueError(
            f"example_inputs {unknown}: {adapter.class_name} is traced with {list(adapter.input_names)}; "
            "drop the others."
        )
    # in the order calls bind them (`TokenCacheTransformer._bind`), so the first call reuses this trace
    example_inputs = {n: example_inputs[n] for n in adapter.input_names if example_inputs.get(n) is not None}
    with _TRACE_LOCK.tracing():
        graphs = build_step_graphs(model, adapter, plan, example_inputs, policy, predictor)
    compile_options = None if backend is None else {"backend": backend, "mode": compile_mode}
    return TokenCacheTransformer(model, plan, adapter, graphs, plan_dir, policy, compile_options, predictor)
