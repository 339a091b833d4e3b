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
import functools
import inspect
import json
import logging
import sys
import threading
import warnings
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import ModelMixin  # also how diffusers finds our loader (model_index.json: "tcpass.torch_runtime")
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from tcpass.adapters import ModelAdapter, adapter_for, quiet_load_kwargs
from tcpass.compile import compile_step_graphs
from tcpass.contracts import residual_history
from tcpass.controller import StepController
from tcpass.files import resolve_path, sha256_of, write_atomic
from tcpass.graphs import StepGraphs, build_step_graphs, check_dtypes
from tcpass.plan import CachePlan, load_plan
from tcpass.schedule import Step, StepKind, check_timestep
from tcpass.selectors import TokenSelector, make_selector
from tcpass.trace import constant_inputs, flatten_inputs

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

# Methods of the wrapped model that change what it computes. Called on the transformed model, each is
# applied to the wrapped model, then every graph traced from that model is dropped and traced again on
# its next call (`_Retraced`): the result is what transforming the changed model gives.
_RETRACED = (
    # attention processors and backends
    "set_attn_processor",
    "set_default_attn_processor",
    "set_attention_backend",
    "reset_attention_backend",
    "fuse_qkv_projections",
    "unfuse_qkv_projections",
    "enable_forward_chunking",
    "disable_forward_chunking",
    # LoRA: diffusers' PeftAdapterMixin (Flux, SD3, ...), the ones that add or remove layers
    "load_lora_adapter",
    "add_adapter",
    "unload_lora",
    "delete_adapters",
)
# LoRA methods that only change peft's layer flags (merged, active, disabled, scalings): forwarded,
# and the next call re-traces only if the graphs depend on what changed (`_adapter_state`). A merged
# LoRA layer computes its base layer alone, whose weights the graphs read when they run, so switching
# fused adapters (``unfuse_lora``, ``set_adapters``, ``fuse_lora``) needs no re-trace.
_FORWARDED = (
    "set_adapter",
    "set_adapters",
    "enable_adapters",
    "disable_adapters",
    "enable_lora",
    "disable_lora",
    "fuse_lora",
    "unfuse_lora",
)
# What the wrapped model says about itself, read through: keys of ``attn_processors`` are the
# wrapped model's module names, as ``set_attn_processor`` takes them.
_READ_THROUGH = ("attn_processors", "original_attn_processors", "peft_config", "active_adapters", "save_lora_adapter")

# ModelMixin methods that cannot reach the graphs, each with the reason and what to do instead.
_REFUSED = {
    "enable_layerwise_casting": "it stores weights in float8 and casts them per layer at run time; tcpass graphs "
    "compute in the weights' own dtype (float32, float16 or bfloat16). Use `.to(torch.bfloat16)` instead",
    "enable_group_offload": "it moves weights between devices with hooks around each layer while the graphs run; "
    "call it on the original model and run that, or keep the transformed model on one device",
    "compile_repeated_blocks": "tcpass compiles its own step graphs; pass `backend='inductor'` to `tcpass.transform`",
    "enable_parallelism": "context parallelism shards the token sequence across devices, which TokenCache's "
    "per-token caches do not follow; run the original model for it",
    "enable_cache": "diffusers' caches (FirstBlockCache, TaylorSeer, MagCache, FasterCache, pyramid attention "
    "broadcast) hook the model's blocks, which tcpass graphs never call: tcpass is the cache here. To compare "
    "with them, call it on the original model",
    "enable_xformers_memory_efficient_attention": "xformers needs CUDA; on a GPU call "
    "`set_attention_backend('xformers')`, which re-traces",
    "set_use_memory_efficient_attention_xformers": "xformers needs CUDA; on a GPU call "
    "`set_attention_backend('xformers')`, which re-traces",
    "enable_npu_flash_attention": "call `set_attention_backend('_native_npu')` instead, which re-traces",
    "set_use_npu_flash_attention": "call `set_attention_backend('_native_npu')` instead, which re-traces",
    "enable_xla_flash_attention": "call `set_attention_backend('_native_xla')` instead, which re-traces",
    "set_use_xla_flash_attention": "call `set_attention_backend('_native_xla')` instead, which re-traces",
}

# Every transformed model, so a change to a wrapped model reaches all graphs traced from it.
_TRANSFORMED: weakref.WeakSet = weakref.WeakSet()


class _Retraced:
    """A method of the wrapped model that changes what it computes: applied to it, then re-traced.

    Absent (``hasattr`` is False) when the wrapped model has no such method, as on the model itself.
    The change runs while no graph of any transformed model runs (graphs of other transformed
    models may share the wrapped model), then every transformed model of that wrapped model drops
    its graphs and caches: the next call traces again, for its own input signature, and starts a new
    generation. With ``retrace=False`` (LoRA flags, `_FORWARDED`) the next call decides instead.
    """

    def __init__(self, name: str, retrace: bool = True) -> None:
        self.name = name
        self.retrace = retrace

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        method = getattr(obj.transformer, self.name)  # AttributeError when the wrapped model lacks it

        @functools.wraps(method)
        def changed(*args, **kwargs):
            with _TRACE_LOCK.tracing():
                try:
                    return method(*args, **kwargs)
                finally:  # a change that raised half-way may still have changed the model
                    if self.retrace:
                        obj.retrace()

        return changed


class _ReadThrough:
    """An attribute of the wrapped model, read through (absent when the wrapped model has none)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return getattr(obj.transformer, self.name)


def _refused(name: str, why: str):
    def refuse(self, *args, **kwargs):
        raise NotImplementedError(f"TokenCacheTransformer.{name} is not supported after `tcpass.transform`: {why}.")

    refuse.__name__ = name
    refuse.__doc__ = f"Not supported after `tcpass.transform`: {why}."
    return refuse


class TokenCacheTransformer(ModelMixin):
    """A diffusion transformer running TokenCache. Build it with `tcpass.transform`.

    Inference only: calls run under ``torch.no_grad()``.

    The wrapped model is registered as ``self.transformer`` and shared: its parameters are the ones
    the graphs compute with. Graphs are built per input signature (shapes, dtypes, device) on first
    use; a new signature or a rising timestep starts a new generation.

    It is a diffusers ``ModelMixin``, so pipelines save, load and move it like their own models:
    ``pipe.save_pretrained(d)`` writes the original model in diffusers' format plus the plan
    (`save_pretrained`), and ``DiffusionPipeline.from_pretrained(d)`` gives the transformed model
    back (`from_pretrained`) once ``tcpass.torch_runtime`` is imported (``from tcpass import transform``).
    ``.to(device/dtype)`` re-traces on the next call. So do the wrapped model's own methods that
    change what it computes, called here: attention processors and backends
    (``set_attn_processor``, ``set_attention_backend``, ``fuse_qkv_projections``, ...) and LoRA
    (``load_lora_adapter``, ``set_adapters``, ``fuse_lora``, ``unload_lora``, ...; what
    ``pipe.load_lora_weights`` and friends call). Each is applied to the wrapped model, then the
    graphs of every transformed model of it are traced again on their next call and a new generation
    starts. The few that cannot reach the graphs (``enable_layerwise_casting``,
    ``enable_group_offload``, xformers/NPU/XLA switches, ...) raise ``NotImplementedError`` naming the fix.

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
        selector: TokenSelector,
        compile_options: dict | None = None,
        predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.transformer = model
        self.predictor = predictor  # the module the selector's CACHED graphs call (dynamic), or None
        self.plan = plan
        self.selector = selector  # the plan's token selector (`tcpass.selectors`), its files loaded
        self.model_adapter = adapter  # the model family's `tcpass.adapters.ModelAdapter`
        self._compile_options = compile_options
        self._graphs: dict[Signature, StepGraphs] = {}
        self._add_graphs(self._signature_of(graphs), graphs)
        self._plan_dir = plan_dir
        self._forward_signature = inspect.signature(model.forward)
        history = residual_history(plan.skip.history) if plan.skip is not None else []
        self._controller = StepController(plan.schedule, plan.skip, "TokenCacheTransformer", history)
        self._context_buffers: dict[tuple[str, Signature], list[torch.Tensor]] = {}
        _TRANSFORMED.add(self)

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
        reads it back. Safetensors always: with ``safe_serialization=False`` the weights are still
        written as safetensors, with a warning (a pickle file runs code when it is loaded; diffusers
        and any ``from_pretrained`` load safetensors the same way, ``variant`` included).
        """
        if not safe_serialization:
            warnings.warn(
                "safe_serialization=False: tcpass writes the weights as safetensors anyway (it never writes "
                "pickle, which runs code when loaded); from_pretrained loads them the same way.",
                UserWarning,
                stacklevel=2,
            )
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

    def state_dict(self, *args, **kwargs):
        """The wrapped model's state dict, under its own names (what diffusers' and peft's LoRA code reads)."""
        return self.transformer.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load into the wrapped model (its names). Values copied in place need no re-trace; ``assign=True``
        replaces the parameters, so the graphs are traced again on the next call."""
        with _TRACE_LOCK.tracing():
            result = self.transformer.load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            self.retrace()
        return result

    def _apply(self, fn, recurse: bool = True):
        # Graphs (and their cache buffers) bake in device-specific constants: rebuild them after a .to()/.half()
        # that moved or converted something, in every transformed model of this wrapped model (its parameters
        # are converted for all of them). A .to() that changes nothing (model CPU offload's hook calls one before
        # every forward) keeps them.
        before = self._placement()
        out = super()._apply(fn, recurse)
        if self._placement() != before:
            self.retrace()
        return out

    def _placement(self) -> set[tuple[torch.device, torch.dtype]]:
        tensors = [*self.transformer.parameters(), *self.transformer.buffers()]
        return {(t.device, t.dtype) for t in tensors}

    def _drop_graphs(self) -> None:
        """Forget every traced graph and cache: the next call traces again and starts a new generation."""
        self._graphs.clear()
        self._context_buffers.clear()
        self.reset()

    def retrace(self) -> None:
        """Trace the graphs again on the next call, here and in every transformed model of ``self.transformer``.

        Call it after changing the wrapped model by means tcpass does not see: peft's own API on a
        model without diffusers' LoRA methods (DiT, PixArt: ``peft.inject_adapter_in_model(config,
        tm.transformer)``), a replaced module, a processor's attributes edited in place. The wrapped
        model's own methods that change it (``set_attn_processor``, ``load_lora_adapter``, ...) call
        it themselves. Weights changed in place (``p.data.copy_(...)``) need none: the
        graphs read the parameters when they run. The next call starts a new generation (FULL step).
        """
        for other in list(_TRANSFORMED):
            if other.transformer is self.transformer:
                other._drop_graphs()

    # State --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop the caches: the next call is FULL and starts a new generation.

        Not needed between generations that restart the timestep sequence (detected
        automatically); useful when a new generation starts at a lower timestep (img2img).
        """
        self._controller.reset()
        self.selector.reset()

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
        return self._graphs_for(self._signature(flatten_inputs(inputs), constant_inputs(inputs)), inputs)

    def _adapter_state(self) -> tuple:
        """What peft's LoRA layers of the wrapped model decide in Python when traced.

        A merged, enabled layer runs its base layer alone (weights read when the graphs run); any
        other runs its active adapters at their scalings. Changed by diffusers' LoRA methods, and
        directly by pipelines (``pipe.unfuse_lora`` unmerges the layers itself).
        """
        return tuple(
            "merged"
            if m.merged and not m.disable_adapters
            else (tuple(m.active_adapters), m.disable_adapters, tuple(sorted(m.scaling.items())))
            for m in self._tuners
        )

    def _graphs_for(self, key: Signature, inputs: dict) -> StepGraphs:
        if self._tuners and self._adapter_state() != self._traced_adapter_state:
            self.retrace()  # LoRA layers changed what the graphs compute (`_FORWARDED`, or a pipeline directly)
        if key not in self._graphs:
            logger.info("tcpass: tracing %s for a new input signature", type(self.transformer).__name__)
            with _TRACE_LOCK.tracing():
                graphs = build_step_graphs(
                    self.transformer, self.model_adapter, self.plan, inputs, self.selector, self.predictor
                )
            self._add_graphs(key, graphs)
        return self._graphs[key]

    def _add_graphs(self, key: Signature, graphs: StepGraphs) -> None:
        if not self._graphs:  # the first graphs of this state of the wrapped model: note its LoRA layers
            tuners = sys.modules.get("peft.tuners.tuners_utils")  # only if peft is in use
            base = tuners.BaseTunerLayer if tuners is not None else ()
            self._tuners = [m for m in self.transformer.modules() if isinstance(m, base)] if base else []
            self._traced_adapter_state = self._adapter_state()
        if self._compile_options is not None:
            compile_step_graphs(graphs, **self._compile_options)
        self._graphs[key] = graphs

    # Calling ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, **where):
        """Calls inside use their own caches and schedule state, kept under ``name``.

        ``where``: what diffusers' own cache contexts take to place the call in the denoising loop
        (``step_index``, ``sigma``, ...; WanPipeline passes them). tcpass keys its schedule on the
        timestep the call carries, so they are accepted and not needed.

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
        weight = next(self.transformer.parameters(), None)
        if weight is not None and weight.device.type == "meta":
            raise RuntimeError(
                f"{type(self.transformer).__name__}'s weights are on the meta device (sequential CPU offload, or "
                "an offloading device_map): tcpass graphs read the weights directly, not through per-layer "
                "hooks. Use pipe.enable_model_cpu_offload() (whole model; re-traces once per generation on a GPU), "
                "or load the model onto one device."
            )
        inputs = self._bind(args, kwargs)
        flat = flatten_inputs(inputs)
        key = self._signature(flat, constant_inputs(inputs))
        # one scalar read per step, on the schedule's 0..1000 scale; checked before any state changes
        timestep = float(flat[self.model_adapter.timestep_input].reshape(-1)[0]) * self.model_adapter.timestep_scale
        check_timestep(timestep)
        graphs = self._graphs_for(key, inputs)
        decision = self._controller.decide(me, timestep, key, can_cache=bool(graphs.blocks))
        if decision.fresh:
            self.selector.reset()
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
                        torch.from_numpy(self.selector.indices(s.block, s.shape, graphs.num_tokens, timestep)).to(
                            device
                        )
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
    def _signature(inputs: dict[str, torch.Tensor], constants: tuple = ()) -> Signature:
        return tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in inputs.items()) + constants

    @staticmethod
    def _signature_of(graphs: StepGraphs) -> Signature:
        return (
            tuple(
                (n, shape, dtype, graphs.device)
                for n, (shape, dtype) in zip(graphs.input_names, graphs.input_specs, strict=True)
            )
            + graphs.constants
        )


for _name in _RETRACED:
    setattr(TokenCacheTransformer, _name, _Retraced(_name))
for _name in _READ_THROUGH + _FORWARDED:
    setattr(TokenCacheTransformer, _name, _ReadThrough(_name))
for _name, _why in _REFUSED.items():
    setattr(TokenCacheTransformer, _name, _refused(_name, _why))
del _name, _why


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
    selector = make_selector(plan.selector, plan_dir)  # loads and checks the selector's file, if any
    predictor = selector.module(fingerprint.hidden_size, fingerprint.num_blocks)
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
        graphs = build_step_graphs(model, adapter, plan, example_inputs, selector, predictor)
    compile_options = None if backend is None else {"backend": backend, "mode": compile_mode}
    return TokenCacheTransformer(model, plan, adapter, graphs, plan_dir, selector, compile_options, predictor)
