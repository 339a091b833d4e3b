import os

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


# CI's workers take whole files (`--dist loadfile --no-loadscope-reorder`) in collection order; the longest go
# first so that the short ones even out the end (longest-processing-time-first). Seconds per file, both workers
# busy (pytest --junitxml, 2026-12-04); the other files follow, in name order.
FILE_SECONDS = {
    "test_serve.py": 190,
    "test_calibrate.py": 135,
    "test_export.py": 100,
    "test_skip.py": 87,
    "test_families.py": 85,
    "test_conformance.py": 81,
    "test_changes.py": 73,
    "test_video.py": 72,
    "test_dtypes.py": 64,
    "test_golden.py": 56,
    "test_docs.py": 50,
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
