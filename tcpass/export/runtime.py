"""Run an exported tcpass model on ONNX Runtime with numpy alone: no torch, no diffusers.

    from tcpass.export.runtime import OrtTokenCacheRuntime, generate
    runtime = OrtTokenCacheRuntime("exported/")                     # CPU provider by default
    images = generate(runtime, noise, class_labels, num_steps=50, guidance_scale=4.0)

`OrtTokenCacheRuntime` is the deployment twin of `tcpass.TokenCacheTransformer`: per call it reads
the timestep, asks the same TPRR schedule (`tcpass.schedule`, plain Python) which graph to run, and
runs it with IOBinding. Caches stay as OrtValues on the provider's device between calls, so the
CUDA provider never copies them through the host.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tcpass.contracts import MANIFEST_VERSION, history_moves
from tcpass.export import missing_extra
from tcpass.files import sha256_of
from tcpass.plan import CachePlan, StepSkip, TPRRSchedule
from tcpass.policies import policy_class
from tcpass.schedule import StepKind, ThreadGuard, TPRRState, check_guidance_interval, check_timestep, guidance_at

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
            the manifest before any session is built (its cost per MB, measured: README "Deployment").
            ``False`` skips it for very large exports; file sizes and the manifest copy inside
            each graph are still checked, so a truncated file or an edited manifest is still refused.
        session_options: ``onnxruntime.SessionOptions`` for every graph (threads, optimization level);
            when given, ``threads`` is not used.
        threads: intra-op threads per graph (default: ONNX Runtime's, one per physical core).

    Each step graph is its own ONNX Runtime session with its own intra-op thread pool. ONNX Runtime's
    pool threads keep spinning after a run, by default, for the next one; with several graphs taking
    turns, an idle graph's spinning threads take cores from the graph that runs. The runtime sets
    ``session.force_spinning_stop=1`` on its sessions when there is more than one graph (unless
    ``session_options`` already sets it); README "Deployment" gives what it saves.
    """

    def __init__(
        self,
        directory: str | Path,
        providers: list[str] | None = None,
        expected_plan=None,
        verify_checksums: bool = True,
        session_options: ort.SessionOptions | None = None,
        threads: int | None = None,
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
        session_options = _step_session_options(session_options, threads, len(m["graphs"]))
        data_files = {"weights": m["weights"]}  # + the files the token policy exported (static: its table)
        data_files.update({f"selector.{k}": v for k, v in m["selector"].items() if isinstance(v, dict) and "file" in v})
        for field, entry in data_files.items():
            _check_file(self.directory, field, entry, verify_checksums)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, entry in m["graphs"].items():
            path = _check_file(self.directory, f"graphs.{name}", entry, verify_checksums)
            session = ort.InferenceSession(str(path), sess_options=session_options, providers=self.providers)
            _check_signature(path, name, entry, session)
            _check_against_graph(m, path, session)
            self.sessions[name] = session
        schedule = dict(m["schedule"])
        schedule["intervals"] = tuple(schedule["intervals"])
        skip = m["plan"].get("skip")
        self._state = TPRRState(TPRRSchedule(**schedule), None if skip is None else StepSkip(**skip))
        self._inputs = {i["name"]: i for i in m["conditioning_inputs"]}
        self._timestep_input = m["model"]["timestep_input"]
        self._caches: dict[str, ort.OrtValue] | None = None
        skip_inputs = m["graphs"]["skip"]["inputs"] if "skip" in m["graphs"] else []
        self._residual_history = [s["name"] for s in skip_inputs if s.get("kind") == "residual"]  # newest first
        spec = CachePlan.from_dict(m["plan"]).selector
        policy = policy_class(spec.kind)
        # out-of-graph policies choose kept tokens here, with the same numpy definition as the torch runtime
        self._policy = None if policy.in_graph else policy.from_manifest(spec, m["selector"], self.directory)
        self.step_counts = {StepKind.FULL: 0, StepKind.CACHED: 0, StepKind.SKIP: 0}
        self._guard = ThreadGuard("OrtTokenCacheRuntime")
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
    def caches(self) -> dict[str, ort.OrtValue]:
        """The cache tensors by name, as ONNX Runtime holds them between steps (empty before the first
        call of a generation). Read-only: the graphs update them in place."""
        return dict(self._caches or {})

    def input_dtype(self, name: str) -> np.dtype:
        """The numpy dtype the graphs were exported for, for conditioning input ``name`` (float16 for a
        float16 export: callers cast their arrays to it)."""
        if name not in self._inputs:
            raise KeyError(f"no input {name!r}; the graphs take {sorted(self._inputs)}.")
        return np.dtype(_DTYPES[self._inputs[name]["dtype"]])

    def reset(self) -> None:
        """Drop the caches; the next call is FULL and starts a new generation."""
        self._state.reset()
        self._guard.owner = None
        self._drop_caches()

    def _drop_caches(self) -> None:
        self._caches = None
        if self._policy is not None:
            self._policy.reset()

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        """One model call; ``inputs`` are the conditioning inputs by name. Returns the model output.

        Like the torch runtime, one runtime holds one generation: concurrent calls from several
        threads raise ``RuntimeError`` (see `tcpass.schedule.ThreadGuard`); use one runtime per thread.
        """
        with self._guard.call() as me:
            return self._call(me, inputs)

    def _call(self, me: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self._check_inputs(inputs)
        timestep = float(np.asarray(inputs[self._timestep_input]).reshape(-1)[0])
        check_timestep(timestep)
        self._guard.check(me, continues=not self._state.starts_generation(timestep))
        step = self._state.step(timestep)
        if step.new_generation:
            self._drop_caches()
            self._guard.owner = me
        name, kind = "full", StepKind.FULL
        if step.kind is StepKind.SKIP and self._caches is not None:
            name, kind = "skip", StepKind.SKIP
        elif step.kind is StepKind.CACHED and self._caches is not None and self.manifest["phase_graphs"]:
            name, kind = self.manifest["phase_graphs"][str(step.phase)], StepKind.CACHED
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
            for dst, src in history_moves(self._residual_history):  # the residuals a forecast reads
                if self._caches is not None and src in self._caches:
                    caches[dst] = self._caches[src]
            self._caches = caches
        self.step_counts[kind] += 1
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
        return self._policy.indices(spec["block"], tuple(spec["shape"]), num_tokens, timestep)

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
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


_STOP_SPINNING = "session.force_spinning_stop"


def _step_session_options(session_options: ort.SessionOptions | None, threads: int | None, graphs: int):
    """Options for the step graphs' sessions: idle thread pools stop spinning when there are several graphs."""
    if session_options is None:
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default
    if graphs > 1:
        try:
            session_options.get_session_config_entry(_STOP_SPINNING)  # the caller chose: keep it
        except RuntimeError:  # not set
            session_options.add_session_config_entry(_STOP_SPINNING, "1")
    return session_options


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


def ddim_schedule(num_steps: int, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray, float]:
    """DDIM with DiT's linear betas (1e-4..0.02), "leading" spacing, final alpha = alphas_cumprod[0].

    Returns (timesteps in call order, alphas_cumprod, final_alpha_cumprod); matches diffusers'
    DDIMScheduler(beta_schedule="linear", set_alpha_to_one=False).
    """
    betas = np.linspace(0.0001, 0.02, num_train_timesteps, dtype=np.float32)
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    step = num_train_timesteps // num_steps
    timesteps = (np.arange(num_steps) * step)[::-1].astype(np.int64)
    return timesteps, alphas_cumprod, float(alphas_cumprod[0])


def generate(
    runtime: OrtTokenCacheRuntime,
    noise: np.ndarray,
    class_labels: np.ndarray,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    guidance_interval: tuple[float, float] | None = None,
) -> np.ndarray:
    """Class-conditional DDIM (eta 0) with classifier-free guidance, in numpy; returns [B, C, H, W] float32.

    ``guidance_interval`` ``(lo, hi)`` (model timesteps): guidance only at steps with ``lo <= t < hi``,
    the conditional prediction alone elsewhere, as `tcpass.sampling.guided_ddim`; ``None``: the interval
    the export recorded (`OrtTokenCacheRuntime.guidance_interval`; none recorded: every step), ``(0, 1000)``:
    every step.

    The sampler's arithmetic is float32 whatever the export's dtype; the model's input is cast to the
    dtype the graphs take (float16 for a float16 export) and its output back to float32.
    """
    timesteps, alphas_cumprod, final_alpha = ddim_schedule(num_steps)
    step = 1000 // num_steps
    guided = guidance_scale != 1.0
    interval = check_guidance_interval(guidance_interval) or runtime.guidance_interval
    labels = np.asarray(class_labels, dtype=np.int64)
    if guided:
        labels = np.concatenate([labels, np.full_like(labels, runtime.null_label)])
    x = noise.astype(np.float32)
    channels = x.shape[1]
    model_dtype = runtime.input_dtype("hidden_states")
    for t in timesteps:
        model_input = np.concatenate([x, x]) if guided else x
        eps = runtime(
            hidden_states=model_input.astype(model_dtype),
            timestep=np.full(len(model_input), t, dtype=np.int64),
            class_labels=labels,
        )[:, :channels].astype(np.float32)
        if guided:
            cond, uncond = np.split(eps, 2)
            eps = uncond + guidance_at(float(t), guidance_scale, interval) * (cond - uncond)
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[t - step] if t - step >= 0 else final_alpha
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)
    return x
