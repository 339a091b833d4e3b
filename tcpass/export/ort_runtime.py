"""Run an exported tcpass model on ONNX Runtime with numpy alone: no torch, no diffusers.

    from tcpass.export.ort_runtime import OrtTokenCacheRuntime, generate
    runtime = OrtTokenCacheRuntime("exported/")                     # CPU provider by default
    images = generate(runtime, noise, class_labels, num_steps=50, guidance_scale=4.0)

`OrtTokenCacheRuntime` is the deployment twin of `tcpass.TokenCacheTransformer`: per call it reads
the timestep, asks the same TPRR schedule (`tcpass.schedule`, plain Python) which graph to run, and
runs it with IOBinding. Caches stay as OrtValues on the provider's device between calls, so the
CUDA provider never copies them through the host.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tcpass.contracts import MANIFEST_VERSION
from tcpass.controller import GuidanceSteps, StepController
from tcpass.export import missing_extra
from tcpass.files import sha256_of
from tcpass.plan import CachePlan, check_timesteps
from tcpass.schedule import Step, StepKind, check_guidance_interval
from tcpass.selectors import selector_class

try:
    import onnxruntime as ort
except ImportError as e:
    raise missing_extra(e) from e

MANIFEST_METADATA = "tcpass.manifest"  # the manifest copy every graph carries (see `tcpass.export.onnx_export`)
_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64, "int32": np.int32}
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


class ManifestError(ValueError):
    """An exported directory is incomplete or inconsistent; the message names the file and field."""


class OrtTokenCacheRuntime:
    """Step-specialized ONNX graphs + TPRR schedule + caches, on ONNX Runtime.

    Args:
        directory: what `tcpass export` wrote (``manifest.json``, ``*.onnx``, ``weights.bin``).
        providers: ONNX Runtime execution providers; default CPU.
        expected_plan: if given (a plan dict or `CachePlan`), refuse a directory exported for another plan.
        verify_checksums: check every file (graphs, ``weights.bin``, score tables) against its sha256 in
            the manifest before any session is built (its cost per MB, measured: docs/deployment.md).
            ``False`` skips it for very large exports; file sizes and the manifest copy inside
            each graph are still checked, so a truncated file or an edited manifest is still refused.
        session_options: ``onnxruntime.SessionOptions`` for every graph (threads, optimization level);
            when given, ``threads`` is not used. With ``share_weights`` each graph gets a copy of its
            settings (threads, optimization level, execution mode and order, memory flags, logging and
            profiling; configuration entries other than ``session.force_spinning_stop`` are not carried).
        threads: intra-op threads per graph (default: ONNX Runtime's, one per physical core).
        share_weights: hold one copy of the weights for all step graphs (CPU provider): ``weights.bin`` is
            mapped once and each session gets views of it (``SessionOptions.add_initializer``), with
            weight prepacking off (it would make a packed copy per session). Measured on DiT-XL/2 with
            the benchmarks' default plan, 1 thread (`bench/ort_memory.py`, docs/deployment.md): peak RSS
            3.4 instead of 6.1 GiB, loading in 0.9 instead of 12.6 s, but FULL calls 6% and CACHED calls
            19% slower (MLAS packs each weight at every call instead of once). ``False`` (default): each
            session loads and prepacks its own copy. Exports made before the weight table was recorded (no
            ``initializers`` in the manifest's graphs) always load unshared.

    Each step graph is its own ONNX Runtime session with its own intra-op thread pool. ONNX Runtime's
    pool threads keep spinning after a run, by default, for the next one; with several graphs taking
    turns, an idle graph's spinning threads take cores from the graph that runs. The runtime sets
    ``session.force_spinning_stop=1`` on its sessions when there is more than one graph (unless
    ``session_options`` already sets it); docs/deployment.md gives what it saves.
    """

    def __init__(
        self,
        directory: str | Path,
        providers: list[str] | None = None,
        expected_plan: CachePlan | dict | None = None,
        verify_checksums: bool = True,
        session_options: ort.SessionOptions | None = None,
        threads: int | None = None,
        share_weights: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = _load_manifest(self.directory)
        m = self.manifest
        if expected_plan is not None:
            expected = expected_plan if isinstance(expected_plan, dict) else expected_plan.to_dict()
            fields = plan_differences(expected, m["plan"])
            if fields:
                raise ManifestError(
                    f"{self.directory / 'manifest.json'} was exported for another plan (fields {fields} differ); "
                    "export again with this plan."
                )
        self.providers = providers or ["CPUExecutionProvider"]
        self.device = "cuda" if self.providers[0].startswith("CUDA") else "cpu"
        # these providers' ScatterND skips its input copy when output and input share a buffer
        self._in_place = self.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
        graphs = m["graphs"].values()
        shared = share_weights and self.providers[0] == "CPUExecutionProvider"
        shared = shared and all("initializers" in entry for entry in graphs)  # exports before the table: no
        data_files = {"weights": m["weights"]}  # + the files the token selector exported (static: its table)
        data_files.update({f"selector.{k}": v for k, v in m["selector"].items() if isinstance(v, dict) and "file" in v})
        for field, entry in data_files.items():
            _check_file(self.directory, field, entry, verify_checksums)
        self.weights = _SharedWeights(self.directory / m["weights"]["file"]) if shared else None
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, entry in m["graphs"].items():
            path = _check_file(self.directory, f"graphs.{name}", entry, verify_checksums)
            options = _step_session_options(session_options, threads, len(m["graphs"]), fresh=shared)
            if self.weights is not None:
                self.weights.add_to(options, entry["initializers"])
            session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
            _check_signature(path, name, entry, session)
            _check_against_graph(m, path, session)
            self.sessions[name] = session
        self.plan = CachePlan.from_dict(m["plan"])
        self._inputs = {i["name"]: i for i in m["conditioning_inputs"]}
        self._constants = {name: value for name, value in m["model"].get("constants", [])}
        self._timestep_input = m["model"]["timestep_input"]
        skip_inputs = m["graphs"]["skip"]["inputs"] if "skip" in m["graphs"] else []
        history = [s["name"] for s in skip_inputs if s.get("kind") == "residual"]  # newest first
        self._controller = StepController(self.plan.schedule, self.plan.skip, "OrtTokenCacheRuntime", history)
        self._context_caches: dict[str | None, dict[str, ort.OrtValue]] = {}  # per cache context
        selector = selector_class(self.plan.selector.kind)
        # out-of-graph selectors choose kept tokens here, with the same numpy definition as the torch runtime
        self._selector = (
            None if selector.in_graph else selector.from_manifest(self.plan.selector, m["selector"], self.directory)
        )
        self.reset()

    @property
    def null_label(self) -> int | None:
        return self.manifest["model"]["null_label"]

    @property
    def guidance_interval(self) -> tuple[float, float] | None:
        """The model timesteps ``(lo, hi)`` the export recorded for guidance (None: every step)."""
        interval = self.manifest["model"].get("guidance_interval")  # exports before it was recorded: None
        return None if interval is None else (float(interval[0]), float(interval[1]))

    @property
    def step_counts(self) -> dict[StepKind, int]:
        """How many FULL, CACHED and SKIP calls ran since construction."""
        return {kind: self._controller.step_counts[kind] for kind in StepKind}

    @property
    def last_step(self) -> Step | None:
        """The `Step` the latest call ran."""
        return self._controller.last_step

    @property
    def caches(self) -> dict[str, ort.OrtValue]:
        """The cache tensors by name of the current cache context, as ONNX Runtime holds them between steps
        (empty before the first call of a generation). Read-only: the graphs update them in place."""
        return dict(self._caches or {})

    @property
    def _caches(self) -> dict[str, ort.OrtValue] | None:
        return self._context_caches.get(self._controller.context)

    @_caches.setter
    def _caches(self, caches: dict[str, ort.OrtValue] | None) -> None:
        self._context_caches[self._controller.context] = caches

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Calls inside use their own caches and schedule state, kept under ``name`` (split guidance runs
        the conditional and unconditional rows as two such streams), as `tcpass.TokenCacheTransformer` does."""
        with self._controller.cache_context(name):
            yield

    @property
    def timestep_input(self) -> str:
        """The name of the graphs' timestep input."""
        return self._timestep_input

    @property
    def conditioning_names(self) -> list[str]:
        """The graphs' inputs besides the latents (``hidden_states``) and the timestep, in manifest order."""
        return [n for n in self._inputs if n not in ("hidden_states", self._timestep_input)]

    def input_dtype(self, name: str) -> np.dtype:
        """The numpy dtype the graphs were exported for, for conditioning input ``name`` (float16 for a
        float16 export: callers cast their arrays to it)."""
        if name not in self._inputs:
            raise KeyError(f"no input {name!r}; the graphs take {sorted(self._inputs)}.")
        return np.dtype(_DTYPES[self._inputs[name]["dtype"]])

    def reset(self) -> None:
        """Drop the caches of every context; the next call of each is FULL and starts a new generation."""
        self._controller.reset()
        self._context_caches.clear()
        if self._selector is not None:
            self._selector.reset()

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        """One model call; ``inputs`` are the conditioning inputs by name. Returns the model output.

        Like the torch runtime, one runtime holds one generation: concurrent calls from several
        threads raise ``RuntimeError`` (see `tcpass.schedule.ThreadGuard`); use one runtime per thread.
        """
        with self._controller.guard.call() as me:
            return self._call(me, inputs)

    def _call(self, me: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self._check_inputs(inputs)
        timestep = float(np.asarray(inputs[self._timestep_input]).reshape(-1)[0])
        decision = self._controller.decide(me, timestep, can_cache=bool(self.manifest["phase_graphs"]))
        if decision.fresh:
            self._caches = None
            if self._selector is not None:
                self._selector.reset()
        step, kind = decision.step, decision.kind
        name = {StepKind.FULL: "full", StepKind.SKIP: "skip"}.get(kind)
        name = name or self.manifest["phase_graphs"][str(step.phase)]
        entry = self.manifest["graphs"][name]
        session = self.sessions[name]
        binding = session.io_binding()
        for spec in entry["inputs"]:
            if spec["name"] in inputs:
                binding.bind_cpu_input(spec["name"], np.ascontiguousarray(inputs[spec["name"]]))
            elif spec["kind"] == "kept_indices":
                binding.bind_cpu_input(spec["name"], self._kept_indices(spec, timestep))
            elif spec["kind"] == "scale":  # SKIP: weights on the remembered stack residuals, newest first
                weights = np.asarray(step.weights, _DTYPES[spec["dtype"]]).reshape(spec["shape"])
                binding.bind_cpu_input(spec["name"], weights)
            elif self._caches is None or spec["name"] not in self._caches:  # not computed yet this generation
                binding.bind_cpu_input(spec["name"], np.zeros(spec["shape"], _DTYPES[spec["dtype"]]))
            else:
                binding.bind_ortvalue_input(spec["name"], self._caches[spec["name"]])
        in_place = self._in_place_outputs(entry)
        for spec in entry["outputs"]:
            if spec["name"] in in_place:  # ScatterND into its own input: only the K new rows are written
                binding.bind_ortvalue_output(spec["name"], self._caches[in_place[spec["name"]]])
            else:
                binding.bind_output(spec["name"], self.device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if kind is not StepKind.SKIP:
            caches = {s["cache"]: value for s, value in zip(entry["outputs"][1:], outputs[1:], strict=True)}
            for dst, src in decision.history_moves:  # the residuals a forecast reads
                if self._caches is not None and src in self._caches:
                    caches[dst] = self._caches[src]
            self._caches = caches
        self._controller.finished(decision)
        return outputs[0].numpy()

    def _in_place_outputs(self, entry: dict) -> dict[str, str]:
        """Cache outputs to write into their input's buffer; none whose buffer another cache shares."""
        if not self._in_place or self._caches is None:
            return {}
        owners: dict[int, int] = {}
        for value in self._caches.values():
            owners[value.data_ptr()] = owners.get(value.data_ptr(), 0) + 1
        pairs = entry.get("in_place", {})
        return {out: cache for out, cache in pairs.items() if owners[self._caches[cache].data_ptr()] == 1}

    def _kept_indices(self, spec: dict, timestep: float) -> np.ndarray:
        num_tokens = self.manifest["model"]["num_tokens"]
        return self._selector.indices(spec["block"], tuple(spec["shape"]), num_tokens, timestep)

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        constants = _numbers(inputs)
        for name, value in constants.items():
            if name not in self._constants:
                raise ValueError(
                    f"input {name!r} = {value!r}: the graphs take no such number (manifest model.constants)."
                )
            if value != self._constants[name]:
                raise ValueError(
                    f"input {name!r} = {value!r}: the graphs were exported with {self._constants[name]!r} baked in "
                    "(manifest model.constants); export again for other values."
                )
        for name in [n for n, v in inputs.items() if _is_number(v) or _is_numbers(v)]:
            del inputs[name]  # checked above; not graph inputs
        if set(inputs) != set(self._inputs):
            raise ValueError(f"inputs {sorted(inputs)} differ from the exported ones {sorted(self._inputs)}.")
        for name, spec in self._inputs.items():
            array = np.asarray(inputs[name])
            if list(array.shape) != spec["shape"] or array.dtype != _DTYPES[spec["dtype"]]:
                raise ValueError(
                    f"input {name!r}: got shape {list(array.shape)} {array.dtype}, the graphs were exported for "
                    f"shape {spec['shape']} {spec['dtype']} (manifest.json conditioning_inputs); export again for "
                    "other shapes."
                )


def _numbers(inputs: dict) -> dict[str, bool | int | float]:
    """The Python numbers among the inputs, flattened as `tcpass.trace.constant_inputs` names them
    (``rope_interpolation_scale=(0.32, 32, 32)`` -> ``rope_interpolation_scale_0`` ...)."""
    found = {}
    for name, value in inputs.items():
        if _is_number(value):
            found[name] = value
        elif _is_numbers(value):
            found.update({f"{name}_{i}": v for i, v in enumerate(value)})
    return found


def _is_number(value) -> bool:
    """A Python number (numpy scalars are inputs like arrays)."""
    return isinstance(value, (bool, int, float)) and not isinstance(value, np.generic)


def _is_numbers(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(_is_number(v) for v in value)


_STOP_SPINNING = "session.force_spinning_stop"


_CARRIED = (  # SessionOptions settings copied into each graph's own options (share_weights)
    "intra_op_num_threads",
    "inter_op_num_threads",
    "graph_optimization_level",
    "execution_mode",
    "execution_order",
    "enable_cpu_mem_arena",
    "enable_mem_pattern",
    "enable_mem_reuse",
    "use_deterministic_compute",
    "log_severity_level",
    "log_verbosity_level",
    "enable_profiling",
    "profile_file_prefix",
)


def _config_entry(options: ort.SessionOptions, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # not set
        return None


def _step_session_options(
    session_options: ort.SessionOptions | None, threads: int | None, graphs: int, fresh: bool
) -> ort.SessionOptions:
    """Options for one step graph's session: the caller's (``fresh``: a copy of their settings, for a
    session given its own initializers), or threads as asked; idle thread pools stop spinning when there
    are several graphs."""
    options = session_options
    if session_options is None or fresh:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default
    if session_options is not None and fresh:
        for name in _CARRIED:
            setattr(options, name, getattr(session_options, name))
        spinning = _config_entry(session_options, _STOP_SPINNING)
        if spinning is not None:
            options.add_session_config_entry(_STOP_SPINNING, spinning)
    if graphs > 1 and _config_entry(options, _STOP_SPINNING) is None:
        options.add_session_config_entry(_STOP_SPINNING, "1")
    return options


class _SharedWeights:
    """``weights.bin`` mapped once (read-only); each session is given views of it for its initializers.

    ONNX Runtime uses an initializer given by ``SessionOptions.add_initializer`` in place (no copy), as
    long as the value lives: this object keeps every view. Prepacking is turned off in those sessions, as
    it would make a packed copy of each weight per session.
    """

    def __init__(self, path: Path) -> None:
        self.blob = np.memmap(path, dtype=np.uint8, mode="r")
        self.values: list[ort.OrtValue] = []

    def add_to(self, options: ort.SessionOptions, table: list[list]) -> None:
        """Give ``options`` a view for every ``[name, offset, bytes, dtype, shape]`` of a graph's table."""
        for name, offset, length, dtype, shape in table:
            array = self.blob[offset : offset + length].view(np.dtype(dtype)).reshape(shape)
            value = ort.OrtValue.ortvalue_from_numpy(array)
            options.add_initializer(name, value)
            self.values.append(value)
        options.add_session_config_entry("session.disable_prepacking", "1")


def _load_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{path} not found: is {directory} a directory written by `tcpass export`?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != MANIFEST_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ManifestError(
            f"{path}: format_version {version!r}, expected {MANIFEST_VERSION}; export again with this tcpass."
        )
    for key in ("graphs", "phase_graphs", "schedule", "selector", "conditioning_inputs", "caches", "model", "plan"):
        if key not in manifest:
            raise ManifestError(f"{path}: missing field {key!r}.")
    for field in ("file", "bytes", "sha256"):
        if field not in manifest.get("weights", {}):
            raise ManifestError(f"{path}: missing field 'weights.{field}'.")
    return manifest


def _check_file(directory: Path, field: str, entry: dict, verify_checksums: bool) -> Path:
    """``directory / entry["file"]``, refused if missing, of another size, or (verified) of another sha256."""
    path = directory / entry["file"]
    if not path.is_file():
        raise ManifestError(f"{path} is missing (manifest.json {field}.file).")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise ManifestError(f"{path} is {size} bytes but manifest.json {field}.bytes = {entry['bytes']} (truncated?).")
    if verify_checksums and sha256_of(path) != entry["sha256"]:
        raise ManifestError(
            f"{path}: sha256 differs from manifest.json {field}.sha256 (changed since export, or from another "
            "export); export again."
        )
    return path


def _check_against_graph(manifest: dict, path: Path, session: ort.InferenceSession) -> None:
    """Refuse a manifest whose fields differ from the copy the graph was exported with, naming the fields."""
    copy = session.get_modelmeta().custom_metadata_map.get(MANIFEST_METADATA)
    if copy is None:
        raise ManifestError(f"{path} carries no {MANIFEST_METADATA} metadata (an older export?); export again.")
    graphs = {name: {k: v for k, v in entry.items() if k != "sha256"} for name, entry in manifest["graphs"].items()}
    differences = _differences({**manifest, "graphs": graphs}, json.loads(copy), "")
    if differences:
        field, got, exported = differences[0]
        more = f" (and {len(differences) - 1} more field(s))" if len(differences) > 1 else ""
        raise ManifestError(
            f"manifest.json {field} = {json.dumps(got)} but {path.name} was exported with {field} = "
            f"{json.dumps(exported)}{more}: the manifest was edited or belongs to another export; export again."
        )


def _differences(got, exported, where: str) -> list[tuple[str, object, object]]:
    """(dotted field, value here, value exported) for every leaf where two JSON values differ."""
    if isinstance(got, dict) and isinstance(exported, dict):
        return [
            d
            for key in sorted(set(got) | set(exported), key=str)
            for d in _differences(got.get(key), exported.get(key), f"{where}.{key}" if where else str(key))
        ]
    if isinstance(got, list) and isinstance(exported, list) and len(got) == len(exported):
        pairs = enumerate(zip(got, exported, strict=True))
        return [d for i, (a, b) in pairs for d in _differences(a, b, f"{where}[{i}]")]
    return [] if got == exported else [(where, got, exported)]


def _check_signature(path: Path, name: str, entry: dict, session: ort.InferenceSession) -> None:
    for field, declared in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        specs = entry[field]
        if [s["name"] for s in specs] != [d.name for d in declared]:
            raise ManifestError(f"manifest.json graphs.{name}.{field} names do not match {path}.")
        for i, (spec, d) in enumerate(zip(specs, declared, strict=True)):
            if list(spec["shape"]) != list(d.shape) or spec["dtype"] != _ORT_TYPES.get(d.type):
                raise ManifestError(
                    f"manifest.json graphs.{name}.{field}[{i}] ({spec['name']}) is {spec['shape']} {spec['dtype']} "
                    f"but {path.name} declares {list(d.shape)} {d.type}."
                )


def plan_differences(a: dict, b: dict) -> list[str]:
    """The top-level plan fields in which two plan dicts differ; a field one of them lacks (written before
    the field existed, e.g. ``guidance_reuse``) counts as its default."""
    defaults = CachePlan().to_dict()
    a, b = {**defaults, **a}, {**defaults, **b}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _alphas_cumprod(num_train_timesteps: int) -> np.ndarray:
    """DiT's training schedule: cumulative products of ``1 - beta``, linear betas 1e-4..0.02 (float32)."""
    betas = np.linspace(0.0001, 0.02, num_train_timesteps, dtype=np.float32)
    return np.cumprod(1.0 - betas, dtype=np.float32)


def ddim_schedule(num_steps: int, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray, float]:
    """DDIM with DiT's linear betas (1e-4..0.02), "leading" spacing, final alpha = alphas_cumprod[0].

    Returns (timesteps in call order, alphas_cumprod, final_alpha_cumprod); matches diffusers'
    DDIMScheduler(beta_schedule="linear", set_alpha_to_one=False).
    """
    alphas_cumprod = _alphas_cumprod(num_train_timesteps)
    step = num_train_timesteps // num_steps
    timesteps = (np.arange(num_steps) * step)[::-1].astype(np.int64)
    return timesteps, alphas_cumprod, float(alphas_cumprod[0])


def dpmpp_schedule(
    num_steps: int, timesteps: Sequence[int] | None = None, num_train_timesteps: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver++(2M) over DiT's linear betas: (timesteps in call order, sigmas ``sqrt((1 - a) / a)``, one per
    step and a final 0); diffusers' `DPMSolverMultistepScheduler` as `tcpass.sampling.make_scheduler("dpmpp")`
    configures it: ``timesteps`` (`tcpass.plan.check_timesteps`), or ``num_steps`` with "linspace" spacing."""
    alphas_cumprod = _alphas_cumprod(num_train_timesteps)
    if timesteps is None:
        ts = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    else:
        ts = np.array(check_timesteps(timesteps, num_steps, "dpmpp"), dtype=np.int64)
    sigmas = np.interp(ts, np.arange(num_train_timesteps), np.sqrt((1 - alphas_cumprod) / alphas_cumprod))
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def numpy_sampler(
    sampler: str, num_steps: int, timesteps: Sequence[int] | None = None
) -> tuple[np.ndarray, Callable[[int, np.ndarray, np.ndarray], np.ndarray]]:
    """The ONNX Runtime sampler's update, float32 numpy: ``(timesteps in call order, update)`` with
    ``update(i, eps, x)`` the latents after step ``i`` given the (guided) noise prediction ``eps`` at ``x``.

    ``"ddim"`` (eta 0, `ddim_schedule`) or ``"dpmpp"``: DPM-Solver++(2M) (`dpmpp_schedule`), first order at the
    first step and at the last (whose sigma is 0), second order (midpoint) between, as diffusers steps it; its
    history lives in the closure, so one sampler per generation. ``timesteps``: DPM-Solver++ only.
    """
    if sampler not in ("ddim", "dpmpp"):
        raise ValueError(
            f"sampler = {sampler!r}: the ONNX Runtime sampler runs 'ddim' and 'dpmpp'; sample a {sampler!r} plan "
            "with tcpass.sampling.guided_sample."
        )
    if sampler == "ddim":
        if timesteps is not None:
            check_timesteps(timesteps, num_steps, sampler)  # refused, naming the fix
        ts, alphas_cumprod, final_alpha = ddim_schedule(num_steps)
        stride = 1000 // num_steps

        def ddim(i: int, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
            t = ts[i]
            a_t, a_prev = alphas_cumprod[t], alphas_cumprod[t - stride] if t - stride >= 0 else final_alpha
            x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
            return (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)

        return ts, ddim
    ts, sigmas = dpmpp_schedule(num_steps, timesteps)
    alphas = 1 / np.sqrt(sigmas**2 + 1)  # alpha_t, sigma_t = alphas, sigmas * alphas
    lambdas = np.log(alphas[:-1]) - np.log(sigmas[:-1] * alphas[:-1])  # the last (sigma 0) is infinite: unused
    history: list[np.ndarray] = []  # the previous step's data prediction

    def dpmpp(i: int, eps: np.ndarray, x: np.ndarray) -> np.ndarray:
        x0 = (x - sigmas[i] * alphas[i] * eps) / alphas[i]
        if i == len(ts) - 1:  # to sigma 0: the first-order update is the data prediction itself
            return x0.astype(np.float32)
        h = lambdas[i + 1] - lambdas[i]
        d = x0 if not history else x0 + 0.5 * (x0 - history[0]) * h / (lambdas[i] - lambdas[i - 1])
        history[:] = [x0]
        out = (sigmas[i + 1] * alphas[i + 1]) / (sigmas[i] * alphas[i]) * x - alphas[i + 1] * np.expm1(-h) * d
        return out.astype(np.float32)

    return ts, dpmpp


def generate(
    runtime: OrtTokenCacheRuntime,
    noise: np.ndarray,
    conditioning: np.ndarray | dict[str, np.ndarray],
    num_steps: int | None = None,
    guidance_scale: float = 4.0,
    guidance_interval: tuple[float, float] | None = None,
    uncond: dict[str, np.ndarray] | None = None,
    sampler: str | None = None,
) -> np.ndarray:
    """Sample with classifier-free guidance, in numpy (`numpy_sampler`); returns [B, C, H, W] float32.

    ``sampler``: ``"ddim"`` (eta 0) or ``"dpmpp"`` (DPM-Solver++(2M)); ``None``: the export's plan's
    ``sampler`` (a skip table is keyed by the timesteps it was calibrated on), DDIM if it names none. The
    plan's ``sampler_timesteps``, if any, are stepped through. ``num_steps``: ``None``: as many as the plan's
    ``sampler_timesteps``, else 50.
    ``conditioning``: the B samples' conditioning, either class labels [B] (class-conditional models; the
    unconditional rows get the export's null label) or the model's other inputs by name, B rows each (the
    names of manifest.json ``conditioning_inputs``: ``encoder_hidden_states``, ``encoder_attention_mask``,
    ...), with ``uncond`` the same inputs for the unconditional rows (an empty prompt's embedding).
    ``guidance_interval`` ``(lo, hi)`` (model timesteps): guidance only at steps with ``lo <= t < hi``, the
    conditional prediction alone elsewhere; ``None``: the interval the export recorded
    (`OrtTokenCacheRuntime.guidance_interval`; none recorded: every step), ``(0, 1000)``: every step.

    As `tcpass.sampling.guided_sample` (one definition of the guidance: `tcpass.controller.GuidanceSteps`): an
    export whose plan has ``guidance_reuse`` (exported at B rows) runs split guidance, the conditional rows
    every step and the unconditional rows as a second cache context only where the plan says; otherwise
    the graphs take ``[cond; uncond]`` (2B rows) every step.

    The sampler's arithmetic is float32 whatever the export's dtype; the model's inputs are cast to the
    dtypes the graphs take (float16 for a float16 export) and its output back to float32.
    """
    plan = runtime.plan
    calibrated = plan.sampler_timesteps
    steps = num_steps if num_steps is not None else len(calibrated) if calibrated is not None else 50
    timesteps, update = numpy_sampler(sampler or plan.sampler or "ddim", steps, calibrated)
    cond, uncond = _conditioning(runtime, conditioning, uncond)
    guided = guidance_scale != 1.0 and uncond is not None
    interval = check_guidance_interval(guidance_interval) or runtime.guidance_interval
    guidance = GuidanceSteps(guidance_scale, interval, split=plan.guidance_reuse, every=plan.guidance_every)
    x = noise.astype(np.float32)
    channels = x.shape[1]

    def call(latents: np.ndarray, t: int, rows: dict[str, np.ndarray], stream: str | None = None) -> np.ndarray:
        with runtime.cache_context(stream) if stream else contextlib.nullcontext():
            out = runtime(
                hidden_states=latents.astype(runtime.input_dtype("hidden_states")),
                **{runtime.timestep_input: np.full(len(latents), t, dtype=runtime.input_dtype(runtime.timestep_input))},
                **rows,
            )
        return out[:, :channels].astype(np.float32)

    batched = {k: np.concatenate([v, uncond[k]]) for k, v in cond.items()} if guided and not guidance.split else None
    for i, t in enumerate(timesteps):
        scale = guidance.scale_at(float(t))
        if batched is not None:
            c, u = np.split(call(np.concatenate([x, x]), t, batched), 2)
            eps = u + scale * (c - u)
        elif guided:  # split guidance
            eps = call(x, t, cond, "cond")
            if guidance.runs_uncond(float(t), runtime.last_step.kind):
                difference = eps - call(x, t, uncond, "uncond")
            if scale != 1.0:
                eps = eps + (scale - 1.0) * difference
        else:
            eps = call(x, t, cond)
        x = update(i, eps, x)
    return x


def _conditioning(
    runtime: OrtTokenCacheRuntime, conditioning: np.ndarray | dict, uncond: dict | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The conditional and unconditional rows' inputs by name, cast to the exported dtypes."""
    if not isinstance(conditioning, dict):  # class labels; the unconditional rows get the null label
        if runtime.null_label is None:
            raise ValueError(
                "class labels were given but the export takes no class labels; pass the model's conditioning "
                f"inputs by name ({sorted(runtime.conditioning_names)}) and uncond= for guidance."
            )
        labels = np.asarray(conditioning, dtype=np.int64)
        conditioning, uncond = {"class_labels": labels}, {"class_labels": np.full_like(labels, runtime.null_label)}
    expected = set(runtime.conditioning_names)
    for name, rows in (("conditioning", conditioning), ("uncond", uncond)):
        if rows is not None and set(rows) != expected:
            raise ValueError(
                f"{name} has inputs {sorted(rows)}; the export takes {sorted(expected)} besides the latents "
                "and the timestep (manifest.json conditioning_inputs)."
            )

    def cast(rows):
        return None if rows is None else {k: np.asarray(v).astype(runtime.input_dtype(k)) for k, v in rows.items()}

    return cast(conditioning), cast(uncond)
