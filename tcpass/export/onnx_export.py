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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

from tcpass.export.index_ops import in_place_updates, rows_as_slices
from tcpass.graphs import StepGraph, StepGraphs
from tcpass.passes.layout import TensorSpec
from tcpass.runtime import TokenCacheTransformer
from tcpass.selectors import StaticScoreSelector

MANIFEST_VERSION = 1
WEIGHTS_FILE = "weights.bin"
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


def _export_graph(
    step_graph: StepGraph,
    model_inputs: dict[str, torch.Tensor],
    path: Path,
    opset: int,
    weights: dict,
    blob: bytearray,
    row_slices: bool,
) -> dict:
    device = next(iter(model_inputs.values())).device
    caches = [s.example(device) for s in step_graph.cache_specs]
    indices = [s.example(device) for s in step_graph.index_specs]
    is_full = step_graph.role == "full"
    cache_inputs = [] if is_full else step_graph.cache_specs
    cache_outputs = [] if step_graph.role == "skip" else step_graph.cache_specs
    args = tuple(model_inputs.values()) + (() if is_full else tuple(caches) + tuple(indices))
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
    if row_slices:
        model, _ = rows_as_slices(model)
    onnx.save_model(model, str(path))
    with torch.no_grad():
        sample = step_graph.gm(*args)[0]
    return {
        "file": path.name,
        "inputs": [
            *({"name": n, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in model_inputs.items()),
            *(_spec_json(s) for s in cache_inputs),
            *(_spec_json(s) for s in step_graph.index_specs),
        ],
        "outputs": [{"name": "sample", "shape": list(sample.shape), "dtype": _dtype_name(sample.dtype)}]
        + [{**_spec_json(s), "name": f"{s.name}.next", "cache": s.name} for s in cache_outputs],
        "keep": {str(b): k for b, k in step_graph.keep.items()},
        "in_place": in_place_updates(model),
    }


def export_onnx(
    model: TokenCacheTransformer,
    out_dir: str | Path,
    inputs: dict[str, torch.Tensor] | None = None,
    opset: int = 20,
    null_label: int | None = None,
    row_slices: bool = True,
) -> Path:
    """Write ONNX graphs + manifest for ``model`` at the input signature of ``inputs``; returns the manifest path.

    ``inputs`` fixes the static shapes (default: the signature the model was transformed with).
    ``null_label`` (class-conditional models) is recorded for classifier-free guidance at runtime.
    ``row_slices``: rewrite per-row token gathers/scatters into row copies (GatherND/ScatterND, caches
    updated in place by the runtime); same results, faster CACHED steps. False keeps the exporter's
    element-wise GatherElements/ScatterElements (for comparison).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs: StepGraphs = model.step_graphs(inputs)
    if inputs is None:
        inputs = {
            n: torch.zeros(shape, dtype=dtype)
            for n, (shape, dtype) in zip(graphs.input_names, graphs.input_specs, strict=True)
        }
    weights: dict[str, tuple[int, int]] = {}
    blob = bytearray()

    def export(step_graph: StepGraph, name: str) -> dict:
        return _export_graph(step_graph, inputs, out_dir / f"{name}.onnx", opset, weights, blob, row_slices)

    entries = {"full": export(graphs.full, "full")}
    phase_graphs = {}
    exported: dict[int, str] = {}
    for phase, step_graph in graphs.cached.items():
        if id(step_graph) not in exported:
            name = f"cached_phase{phase}"
            entries[name] = export(step_graph, name)
            exported[id(step_graph)] = name
        phase_graphs[str(phase)] = exported[id(step_graph)]
    if graphs.skip is not None:
        entries["skip"] = export(graphs.skip, "skip")
    (out_dir / WEIGHTS_FILE).write_bytes(bytes(blob))
    for name, entry in entries.items():
        onnx.checker.check_model(str(out_dir / entry["file"]))
        entry["sha256"] = hashlib.sha256((out_dir / entry["file"]).read_bytes()).hexdigest()
        entries[name] = entry
    plan = model.plan
    selector = {"kind": plan.selector.kind, "seed": plan.selector.seed}
    if plan.selector.kind == "static":
        table: StaticScoreSelector = model._selector
        np.save(out_dir / "static_scores.npy", table.scores.numpy(), allow_pickle=False)
        np.save(out_dir / "static_timesteps.npy", table.timesteps.numpy(), allow_pickle=False)
        selector["blocks"] = sorted(table.rows, key=table.rows.get)
    manifest = {
        "format_version": MANIFEST_VERSION,
        "model": {
            "class": type(model.transformer).__name__,
            "fingerprint": model._adapter.fingerprint(model.transformer).__dict__,
            "num_tokens": graphs.num_tokens,
            "null_label": null_label,
            "timestep_input": model._adapter.timestep_input,
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
        "weights": {"file": WEIGHTS_FILE, "bytes": len(blob), "tensors": len(weights)},
        "opset": opset,
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
