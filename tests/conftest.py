import functools
import os
import types

import pytest
import torch
from diffusers import DiTTransformer2DModel

# CI runs the suite on 2 cores as 2 pytest-xdist workers: one torch thread each (more would oversubscribe
# the cores, which slows torch far more than it gains); a plain `pytest` run uses both cores.
# TCPASS_TEST_THREADS overrides both (tests/kernel_sets.sh: the numerics under another thread count).
torch.set_num_threads(int(os.environ.get("TCPASS_TEST_THREADS") or (1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)))


@pytest.fixture(scope="session", autouse=True)
def one_onnx_registry():
    """Every ONNX export in the session shares one op registry (per opset): ``torch.onnx.export`` builds it
    from onnxscript's torchlib on every call (about 0.85 s here, a sixth of a tiny model's export), and only a
    ``custom_translation_table``, which tcpass never passes, writes into it. The exported graphs are the same."""
    from torch.onnx._internal.exporter import _registration

    build = _registration.ONNXRegistry.from_torchlib.__func__
    built: dict = {}

    def from_torchlib(cls, opset_version=_registration._constants.TORCHLIB_OPSET):
        if opset_version not in built:
            built[opset_version] = build(cls, opset_version)
        return built[opset_version]

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    yield
    _registration.ONNXRegistry.from_torchlib = classmethod(build)


@pytest.fixture(scope="session", autouse=True)
def one_onnx_export_per_graph():
    """``torch.onnx.export`` runs once per distinct graph in the session: a call with the same graph code,
    the same weights (names and bytes), the same input layouts and the same options gets the program the first
    call made (tcpass only reads its ``model_proto``, serialized anew on each read). Tests export one
    transformed model several times (other null labels, opsets, re-exports); each export costs seconds."""
    import hashlib
    import operator

    export = torch.onnx.export
    programs: dict = {}

    def key(model, args, kwargs):
        graphs = [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
        if len(graphs) != 1 or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        gm = graphs[0]
        digest = hashlib.sha256(gm.code.encode())
        tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
        for node in gm.graph.nodes:  # constants the graph reads besides parameters and buffers
            if node.op == "get_attr" and isinstance(value := operator.attrgetter(node.target)(gm), torch.Tensor):
                tensors[node.target] = value
        for name, t in sorted(tensors.items()):
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.device}".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        layouts = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        return digest.hexdigest(), layouts, repr(sorted(kwargs.items()))

    def cached(model, args=(), **kwargs):
        k = key(model, args, kwargs)
        if k is None:
            return export(model, args, **kwargs)
        if k not in programs:
            programs[k] = export(model, args, **kwargs)
        return programs[k]

    torch.onnx.export = cached
    yield
    torch.onnx.export = export


class _Uncacheable(Exception):
    """A model or call whose trace `one_trace_per_model_structure` cannot key safely: it is traced anew."""


def _value_key(value, depth: int = 0):
    """A hashable stand-in for an attribute that ``forward`` may read; tensors by their bytes, objects (attention
    processors, configs) by their type and attributes. Anything else (functions, closures) cannot be keyed."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)):
        return (type(value).__name__, repr(value))
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad, hash(data))
    if isinstance(value, os.PathLike):
        return ("path", os.fspath(value))
    if depth > 8:
        raise _Uncacheable(type(value).__name__)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_value_key(v, depth + 1) for v in value]
        return (type(value).__name__, tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items))
    if isinstance(value, dict):
        return (type(value).__name__, tuple((repr(k), _value_key(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, types.FunctionType) and not value.__closure__:  # module-level functions: by identity
        return ("function", value.__module__, value.__qualname__, id(value))
    if isinstance(value, (types.BuiltinFunctionType, type)):
        return ("builtin", getattr(value, "__qualname__", ""), id(value))
    if isinstance(value, (types.FunctionType, types.MethodType, functools.partial, torch.nn.Module)):
        raise _Uncacheable(type(value).__name__)  # closures, bound methods, modules held outside `_modules`
    if hasattr(value, "__dict__"):  # attention processors, enums, configs: their type and their attributes
        cls = type(value)
        return (cls.__module__, cls.__qualname__, _value_key(vars(value), depth + 1))
    raise _Uncacheable(type(value).__name__)


_MODULE_STATE = {"_parameters", "_buffers", "_modules", "training"}
_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")


def _structure_key(model: torch.nn.Module) -> tuple:
    """What a trace of ``model`` depends on besides its inputs: every module's class, mode and attributes, its
    parameters' and buffers' layouts (not their values: the trace reads those by reference) and plain tensors'
    bytes (those the trace bakes in). Forward hooks make a model uncacheable."""
    from torch.nn.modules import module as nn_module

    if any(getattr(nn_module, f"_global{name}", None) for name in _FORWARD_HOOKS):
        raise _Uncacheable("global forward hooks")
    parts = []
    for name, m in model.named_modules(remove_duplicate=False):
        if any(getattr(m, hooks, None) for hooks in _FORWARD_HOOKS):
            raise _Uncacheable(f"forward hooks on {name!r}")
        cls = type(m)
        tensors = tuple(
            (kind, k, None if t is None else (tuple(t.shape), t.dtype, t.device, t.requires_grad, type(t).__name__))
            for kind, table in (("p", m._parameters), ("b", m._buffers))
            for k, t in table.items()
        )
        rest = {k: v for k, v in vars(m).items() if k not in _MODULE_STATE and not k.endswith("hooks")}
        parts.append((name, cls.__module__, cls.__qualname__, m.training, tensors, _value_key(rest)))
    return tuple(parts)


def _bind(gm: torch.fx.GraphModule, tensors: dict) -> torch.fx.GraphModule:
    """``gm`` reading ``tensors`` (``{qualified name: parameter or buffer}``) where it has those names."""
    for fqn, value in tensors.items():
        *path, field = fqn.split(".")
        try:
            owner = gm.get_submodule(".".join(path))
        except AttributeError:
            continue  # a name the passes dropped from the graph
        table = owner._parameters if isinstance(value, torch.nn.Parameter) else owner._buffers
        if field in table:
            table[field] = value
    return gm


TRACE = "tcpass_test_trace"  # GraphModule.meta: (trace id, {name: this model's parameter or buffer})


@pytest.fixture(scope="session", autouse=True)
def one_trace_per_model_structure():
    """A model's trace as tcpass takes it (`tcpass.trace.export_graph`, then the ``clean`` pass: the exported
    module made positional and fake-propagated in full) is made once per model structure and call signature in
    the session: another model object with the same classes, configuration, attributes (attention processors
    and their settings), parameter layouts and input layouts gets a copy of the first, bound to its own
    parameters and buffers (a trace reads them by reference, as `tcpass.trace.reusing_traces` relies on).
    Tests build the same tiny models hundreds of times, and the two cost about 0.9 s of a tiny model's 1.3 s
    transform. A model with forward hooks, or holding what cannot be keyed, is traced anew; the passes after
    ``clean`` always run."""
    import operator
    import threading

    from tcpass.passes import pipeline
    from tcpass.trace import copy_graph_module

    export, clean, passes = torch.export.export, pipeline.clean, pipeline.PIPELINE
    traces: dict = {}  # key -> (trace id, the exported module before any pass, names the model's tensors have)
    cleaned: dict = {}  # (trace id, input names and layouts) -> the cleaned trace
    lock = threading.RLock()

    class Program:
        """What `export_graph` reads of an ExportedProgram: its module."""

        def __init__(self, gm):
            self._gm = gm

        def module(self):
            return self._gm

    def input_key(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
        if isinstance(value, dict):
            return tuple((k, input_key(v)) for k, v in value.items())
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(input_key(v) for v in value))
        if value is None or isinstance(value, (bool, int, float, str)):
            return (type(value).__name__, repr(value))
        raise _Uncacheable(type(value).__name__)

    def cached_export(model, args=(), kwargs=None, **options):
        if args != () or not kwargs or not isinstance(model, torch.nn.Module):
            return export(model, args, kwargs, **options)
        try:
            key = (_structure_key(model), input_key(kwargs), repr(sorted(options.items())))
            key += (torch.is_grad_enabled(), torch.get_default_dtype())
        except _Uncacheable:
            return export(model, args, kwargs, **options)
        with lock:
            gm = None
            if key not in traces:
                gm = export(model, args, kwargs, **options).module()
                names = []
                for fqn, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
                    try:
                        if operator.attrgetter(fqn)(model) is t:
                            names.append(fqn)
                    except AttributeError:
                        pass  # a constant the trace made: equal for every model of this key
                traces[key] = (len(traces), copy_graph_module(gm), names)
            trace_id, pristine, names = traces[key]
            tensors = {n: operator.attrgetter(n)(model) for n in names}
            if gm is None:
                gm = _bind(copy_graph_module(pristine), tensors)
            gm.meta[TRACE] = (trace_id, tensors)
            return Program(gm)

    def cached_clean(build) -> None:
        if TRACE not in build.traced.meta:
            return clean(build)
        trace_id, tensors = build.traced.meta[TRACE]
        layouts = tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad) for t in build.example)
        key = (trace_id, tuple(build.input_names), layouts)
        with lock:
            if key not in cleaned:
                clean(build)
                cleaned[key] = copy_graph_module(build.traced)
                return
            gm = _bind(copy_graph_module(cleaned[key]), tensors)
        gm.meta.update(build.traced.meta)  # this call's image-token count and tensors
        build.traced = gm

    torch.export.export = cached_export
    pipeline.PIPELINE = tuple(cached_clean if p is clean else p for p in passes)
    yield
    torch.export.export, pipeline.PIPELINE = export, passes


# CI's workers take whole files (`--dist loadfile --no-loadscope-reorder`) in collection order; the longest go
# first so that the short ones even out the end (longest-processing-time-first). Seconds per file, both workers
# busy (pytest --durations=0, 2026-12-04, traces shared as below); the other files follow, in name order.
FILE_SECONDS = {
    "test_serve.py": 182,
    "test_calibrate.py": 107,
    "test_export.py": 59,
    "test_conformance.py": 55,
    "test_video.py": 44,
    "test_changes.py": 38,
    "test_docs.py": 38,
    "test_skip.py": 34,
    "test_dtypes.py": 33,
    "test_families.py": 33,
    "test_golden.py": 33,
    "test_device.py": 28,
    "test_forecast_taylor.py": 25,
}


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: each file keeps its order


def make_dit(num_layers: int = 3, sample_size: int = 16, seed: int = 0) -> DiTTransformer2DModel:
    """A tiny class-conditional DiT: hidden 32, 2 heads, (sample_size/2)^2 tokens."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline uses label 1000 as the CFG null class
        norm_num_groups=32,
    ).eval()
    # Random adaLN-zero gates start at zero in diffusers; give them weight so blocks do something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0, 0.2)
    return model


def dit_inputs(batch: int = 2, sample_size: int = 16, t: int = 900, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, sample_size, sample_size, generator=g),
        "timestep": torch.full((batch,), t, dtype=torch.long),
        "class_labels": torch.randint(0, 10, (batch,), generator=g),
    }


@pytest.fixture
def dit():
    return make_dit()
