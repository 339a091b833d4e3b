"""Export a transformed model's step-specialized graphs to ONNX, with a manifest for the runtime.

Output directory::

    manifest.json        schedule, graphs, their inputs/outputs, caches, conditioning inputs
    full.onnx            FULL step: model inputs -> (sample, *caches)
    cached_phase0.onnx   CACHED step(s): model inputs, caches[, kept indices] -> (sample, *caches)
                         (``in_place``: cache outputs the runtime may write into their input's buffer)
    weights.bin          every parameter once; all graphs reference it as ONNX external data
    static_scores.npy    (static selector only) the score table, as plain numpy

The graphs are the very graphs the eager and compiled executors run (the passes' output), exported
with torch's dynamo ONNX exporter; nothing about the caching semantics is redefined here.

Integrity: the manifest records the sha256 of every file (graphs, ``weights.bin``, score tables),
and every graph carries a copy of the manifest (minus the graphs' own sha256) in its ONNX metadata
(``tcpass.manifest``), so the runtime refuses a tampered file or a hand-edited manifest field.
The export is written into a temporary directory next to ``out_dir`` and renamed into place at the
end: an interrupted export leaves the previous one untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

import torch

from tcpass.export import OPSETS, missing_extra

try:
    import onnx
    import onnxscript  # noqa: F401  (the dynamo exporter's op library; fail here, not mid-export)
    from onnx import external_data_helper, numpy_helper
except ImportError as e:
    raise missing_extra(e) from e

from tcpass.contracts import MANIFEST_VERSION, TensorSpec
from tcpass.export.index_ops import in_place_updates, rows_as_slices
from tcpass.graphs import StepGraph, StepGraphs
from tcpass.schedule import check_guidance_interval
from tcpass.torch_runtime import TokenCacheTransformer

WEIGHTS_FILE = "weights.bin"
MANIFEST_METADATA = "tcpass.manifest"  # ONNX metadata key of the manifest copy inside each graph
_EXPORT_FILES = {"manifest.json", WEIGHTS_FILE, "static_scores.npy", "static_timesteps.npy"}  # and *.onnx
_INLINE_BYTES = 1024  # initializers smaller than this stay inside each graph


class _Positional(torch.nn.Module):
    # The exporter takes an nn.Module; the step graph is called positionally.
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self.training = False  # the step graph has no train/eval behaviour; keeps the exporter quiet

    def forward(self, *args):
        return self.gm(*args)


@contextlib.contextmanager
def _quiet_exporter():
    # The exporter's op registry logs one warning per torchvision op when torchvision is absent;
    # step graphs never contain torchvision ops.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registry_log.setLevel(level)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spec_json(spec: TensorSpec) -> dict:
    return {
        "name": spec.name,
        "block": spec.block,
        "kind": spec.kind,
        "shape": list(spec.shape),
        "dtype": _dtype_name(spec.dtype),
    }


def _externalize(model: onnx.ModelProto, weights: dict[str, tuple[int, int]], blob: bytearray) -> None:
    """Point large initializers at the shared weights file, appending each distinct tensor once."""
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        data = array.tobytes()
        if len(data) < _INLINE_BYTES:
            continue
        key = hashlib.sha1(data).hexdigest()  # by content: the exporter names folded constants per graph
        if key not in weights:
            offset = (len(blob) + 63) // 64 * 64  # aligned for memory mapping
            blob.extend(b"\0" * (offset - len(blob)))
            blob.extend(data)
            weights[key] = (offset, len(data))
        offset, length = weights[key]
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.raw_data = data  # set_external_data requires raw_data; it is dropped right after
        external_data_helper.set_external_data(tensor, WEIGHTS_FILE, offset=offset, length=length)
        tensor.ClearField("raw_data")


def _external_initializers(model: onnx.ModelProto) -> list[list]:
    """The graph's initializers stored in the weights file, ``[name, offset, bytes, dtype, shape]`` each: what
    the runtime needs to give every session views of one mapping of the file (`tcpass.export.ort_runtime`)."""
    table = []
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            table.append([tensor.name, int(info["offset"]), int(info["length"]), str(dtype), list(tensor.dims)])
    return table


def _bool_where_as_logic(model: onnx.ModelProto) -> None:
    """``Where(c, x, y)`` on bool values as ``Or(And(c, x), And(Not(c), y))``, in place.

    ONNX Runtime implements ``Where`` for numbers, not for bool values (HunyuanVideo builds its
    attention mask with a bool ``masked_fill``); the logical form computes the same, with broadcasting.
    """
    where = [n for n in model.graph.node if n.op_type == "Where"]
    if not where:
        return
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Where" or types.get(node.output[0]) != onnx.TensorProto.BOOL:
            nodes.append(node)
            continue
        c, x, y = node.input
        base = f"{node.name or node.output[0]}_bool"
        make = onnx.helper.make_node
        nodes += [
            make("And", [c, x], [f"{base}_cx"], name=f"{base}_and0"),
            make("Not", [c], [f"{base}_nc"], name=f"{base}_not"),
            make("And", [f"{base}_nc", y], [f"{base}_ny"], name=f"{base}_and1"),
            make("Or", [f"{base}_cx", f"{base}_ny"], [node.output[0]], name=node.name),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _export_graph(
    step_graph: StepGraph,
    model_inputs: dict[str, torch.Tensor],
    file: str,
    opset: int,
    weights: dict,
    blob: bytearray,
    row_slices: bool,
) -> tuple[onnx.ModelProto, dict]:
    device = next(iter(model_inputs.values())).device
    caches = [s.example(device) for s in step_graph.cache_specs]
    indices = [s.example(device) for s in step_graph.index_specs]
    is_full = step_graph.role == "full"
    cache_inputs = step_graph.carried if is_full else step_graph.cache_specs
    cache_outputs = [] if step_graph.role == "skip" else step_graph.cache_specs
    carried = [s.example(device) for s in step_graph.carried]
    args = tuple(model_inputs.values()) + (tuple(carried) if is_full else tuple(caches) + tuple(indices))
    input_names = list(model_inputs) + [s.name for s in cache_inputs] + [s.name for s in step_graph.index_specs]
    output_names = ["sample"] + [f"{s.name}.next" for s in cache_outputs]  # ONNX names are SSA
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            _Positional(step_graph.gm),
            args,
            input_names=input_names,
            output_names=output_names,
            dynamo=True,
            opset_version=opset,
            verbose=False,
        )
    model = program.model_proto
    # Weights out first: shape inference (in rows_as_slices) serializes the model, and protobuf
    # refuses messages over 2 GB (DiT-XL/2 is 2.7 GB of fp32 weights).
    _externalize(model, weights, blob)
    _bool_where_as_logic(model)
    if row_slices:
        model, _ = rows_as_slices(model)
    produced = _opset_of(model)
    if produced != opset:  # the exporter falls back silently; never record an opset the file does not have
        raise ValueError(f"opset = {opset} was requested but the exporter wrote opset {produced}; use one of {OPSETS}.")
    with torch.no_grad():
        sample = step_graph.gm(*args)[0]
    return model, {
        "file": file,
        "inputs": [
            *({"name": n, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in model_inputs.items()),
            *(_spec_json(s) for s in cache_inputs),
            *(_spec_json(s) for s in step_graph.index_specs),
        ],
        "outputs": [{"name": "sample", "shape": list(sample.shape), "dtype": _dtype_name(sample.dtype)}]
        + [{**_spec_json(s), "name": f"{s.name}.next", "cache": s.name} for s in cache_outputs],
        "keep": {str(b): k for b, k in step_graph.keep.items()},
        "in_place": in_place_updates(model),
        "initializers": _external_initializers(model),
    }


def _opset_of(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _file_entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _check_null_label(model: TokenCacheTransformer, input_names: tuple[str, ...], null_label: int | None) -> int | None:
    """The CFG null label, checked against the model config: DiT's label table reserves row ``num_embeds_ada_norm``."""
    if "class_labels" not in input_names:
        if null_label is not None:
            raise ValueError(f"null_label = {null_label}: the model takes no class labels; leave it unset.")
        return None
    reserved = getattr(model.transformer.config, "num_embeds_ada_norm", None)
    if null_label is None:
        return reserved
    if reserved is not None and null_label != reserved:
        raise ValueError(
            f"null_label = {null_label}: the model's class embedding reserves label {reserved} "
            f"(config.num_embeds_ada_norm) for classifier-free guidance; labels 0..{reserved - 1} are classes."
        )
    return null_label


def _check_target(out_dir: Path) -> None:
    """Refuse to replace a directory that holds anything but an earlier export (it is replaced whole)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; choose a new directory to export into.")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _EXPORT_FILES and p.suffix != ".onnx")
    if foreign:
        raise ValueError(
            f"{out_dir} holds files an export does not write ({foreign[:5]}); export into a new or empty "
            "directory, or over an earlier export (which is replaced whole)."
        )


def _sibling(out_dir: Path, role: str) -> Path:
    """An unused hidden name beside ``out_dir`` (same file system, so renaming it is atomic)."""
    return out_dir.parent / f".{out_dir.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}"


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is moved aside first and deleted after."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    old = _sibling(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_exportable_dtypes(graphs: StepGraphs) -> None:
    """ONNX Runtime has no bfloat16 kernels for a DiT's Conv/LayerNorm on CPU (and few on CUDA): refuse
    before anything is written, naming the fix, rather than write graphs no session can load."""
    dtypes = {dtype for _, dtype in graphs.input_specs} | {s.dtype for s in graphs.full.cache_specs}
    if torch.bfloat16 in dtypes:
        raise TypeError(
            "the model runs in bfloat16, which ONNX Runtime cannot run (no bfloat16 Conv/LayerNorm kernels); "
            "export a float16 or float32 copy instead: `tcpass.transform(model.to(torch.float16), plan)`."
        )


def export_onnx(
    model: TokenCacheTransformer,
    out_dir: str | Path,
    inputs: dict[str, torch.Tensor] | None = None,
    opset: int = 20,
    null_label: int | None = None,
    row_slices: bool = True,
    guidance_interval: tuple[float, float] | None = None,
) -> Path:
    """Write ONNX graphs + manifest for ``model`` at the input signature of ``inputs``; returns the manifest path.

    ``inputs`` fixes the static shapes (default: the signature the model was transformed with).
    ``opset``: ONNX opset of the graphs, one of `tcpass.export.OPSETS` (what the exporter writes natively).
    ``null_label`` (class-conditional models) is recorded for classifier-free guidance at runtime;
    default: the label the model's config reserves for it (DiT: ``num_embeds_ada_norm``), and any
    other value is refused. ``guidance_interval`` (model timesteps ``(lo, hi)``) is recorded as the
    sampler's: `tcpass.export.ort_runtime.generate` guides only there unless told otherwise (None: every step).
    ``row_slices``: rewrite per-row token gathers/scatters into row copies (GatherND/ScatterND, caches
    updated in place by the runtime); same results, faster CACHED steps. False keeps the exporter's
    element-wise GatherElements/ScatterElements (for comparison).

    ``out_dir`` is written atomically: the export goes to a temporary directory beside it, renamed
    into place at the end. An existing ``out_dir`` must be empty or an earlier export; it is replaced whole.

    A plan with ``guidance_reuse`` (split guidance) runs the conditional and unconditional rows as two
    streams of B rows each: export it at the batch of one stream (``inputs`` with B rows), as the torch
    sampler calls it; `tcpass.export.ort_runtime.generate` then runs the split.

    Raises:
        ValueError: a bad ``opset`` or ``guidance_interval``; nothing is written.
    """
    if isinstance(opset, bool) or opset not in OPSETS:
        raise ValueError(f"opset = {opset!r}: the exporter writes opsets {OPSETS.start}..{OPSETS.stop - 1}.")
    out_dir = Path(out_dir)
    _check_target(out_dir)
    graphs: StepGraphs = model.step_graphs(inputs)
    _check_exportable_dtypes(graphs)
    null_label = _check_null_label(model, graphs.input_names, null_label)
    interval = check_guidance_interval(guidance_interval)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out_dir, "tmp")
    try:  # mkdir inside: an interrupt right after it still removes the directory
        staging.mkdir()  # not mkdtemp: the export directory gets the usual permissions (umask), not 0700
        _write_export(model, graphs, staging, inputs, opset, null_label, row_slices, interval)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "manifest.json"


def _write_export(
    model: TokenCacheTransformer,
    graphs: StepGraphs,
    out_dir: Path,
    inputs: dict[str, torch.Tensor] | None,
    opset: int,
    null_label: int | None,
    row_slices: bool,
    guidance_interval: tuple[float, float] | None = None,
) -> None:
    if inputs is None:
        inputs = {
            n: torch.zeros(shape, dtype=dtype)
            for n, (shape, dtype) in zip(graphs.input_names, graphs.input_specs, strict=True)
        }
    weights: dict[str, tuple[int, int]] = {}
    blob = bytearray()
    protos: dict[str, onnx.ModelProto] = {}
    entries: dict[str, dict] = {}

    def export(step_graph: StepGraph, name: str) -> None:
        protos[name], entries[name] = _export_graph(
            step_graph, inputs, f"{name}.onnx", opset, weights, blob, row_slices
        )

    export(graphs.full, "full")
    phase_graphs = {}
    exported: dict[int, str] = {}
    for phase, step_graph in graphs.cached.items():
        if id(step_graph) not in exported:
            name = f"cached_phase{phase}"
            export(step_graph, name)
            exported[id(step_graph)] = name
        phase_graphs[str(phase)] = exported[id(step_graph)]
    if graphs.skip is not None:
        export(graphs.skip, "skip")
    (out_dir / WEIGHTS_FILE).write_bytes(bytes(blob))
    plan = model.plan
    selector = {"kind": plan.selector.kind, "seed": plan.selector.seed, **model.selector.export(out_dir, _file_entry)}
    manifest = {
        "format_version": MANIFEST_VERSION,
        "model": {
            "class": type(model.transformer).__name__,
            "fingerprint": model.model_adapter.fingerprint(model.transformer).__dict__,
            "num_tokens": graphs.num_tokens,
            "null_label": null_label,
            "guidance_interval": None if guidance_interval is None else list(guidance_interval),
            "timestep_input": model.model_adapter.timestep_input,
            "constants": [list(c) for c in graphs.constants],  # Python numbers baked into the graphs (LTX's grid)
        },
        "plan": plan.to_dict(),
        "plan_sha256": hashlib.sha256(plan.to_json().encode()).hexdigest(),
        "schedule": plan.to_dict()["schedule"],
        "selector": selector,
        "conditioning_inputs": [
            {"name": n, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in inputs.items()
        ],
        "caches": [_spec_json(s) for s in graphs.full.cache_specs],
        "graphs": entries,
        "phase_graphs": phase_graphs,
        "weights": {**_file_entry(out_dir / WEIGHTS_FILE), "tensors": len(weights)},
        "opset": opset,
    }
    # Each graph carries the manifest it belongs with (the graphs' sha256 cannot be in it: they hash this copy).
    copy = json.dumps(manifest, sort_keys=True)
    for name, proto in protos.items():
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, MANIFEST_METADATA: copy})
        path = out_dir / entries[name]["file"]
        onnx.save_model(proto, str(path))
        onnx.checker.check_model(str(path))
        entries[name]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
