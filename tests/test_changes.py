"""Changes a diffusers user makes to a transformer after `tcpass.transform` reach the graphs.

Each change is applied to the transformed model, and the result must equal transforming a copy of
the model changed the same way (the same graphs, traced again: bit-identical) and differ from what
the unchanged model gives; the default plan must still run CACHED steps afterwards. Changes that
cannot reach the graphs are refused by name, with the fix.
"""

import copy
import warnings

import peft
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import tcpass
from tcpass import CachePlan, StepKind, TPRRSchedule
from tcpass.passes.token_axis import UnsupportedBlockError
from tests.conftest import dit_inputs, make_dit
from tests.families import MAKERS, family_inputs
from tests.tolerance import EXACT, OTHER_KERNELS, REGROUPED, assert_close

STEPS = (0.9, 0.8, 0.7, 0.6)
DEFAULT = CachePlan(schedule=TPRRSchedule(boundary_timestep=0, intervals=(2, 2)))  # FULL, CACHED, FULL, CACHED
LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def inputs(family, t=0.9, seed=1):
    if family == "dit":  # class-conditional: tests/conftest.py's tiny DiT
        return dit_inputs(t=int(t * 1000), seed=seed)
    return family_inputs(family, t=t, seed=seed)


def run(model, family, steps=STEPS):
    with torch.no_grad():
        return [model(**inputs(family, t=t, seed=i), return_dict=False)[0] for i, t in enumerate(steps)]


def transformed(model, family, plan):
    return tcpass.transform(model, plan, example_inputs=inputs(family))


def assert_same(got, want, what, units=EXACT):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, units=units, what=f"{what}, step {i}")


def assert_changed(got, before, what):
    assert max((g - b).abs().max().item() for g, b in zip(got, before, strict=True)) > 1e-3, what


class HalfOutput(AttnProcessor2_0):
    """An attention processor that changes what attention computes (its output halved)."""

    def __call__(self, *args, **kwargs):
        return 0.5 * super().__call__(*args, **kwargs)


@pytest.mark.parametrize("plan", [CachePlan.no_cache(), DEFAULT], ids=["no_cache", "default"])
def test_attention_processor_set_after_transform_reaches_the_graphs(plan):
    model = MAKERS["pixart"]()
    tm = transformed(copy.deepcopy(model), "pixart", plan)
    before = run(tm, "pixart")
    assert set(tm.attn_processors) == set(model.attn_processors)  # the wrapped model's names, as it takes them

    tm.set_attn_processor(HalfOutput())
    model.set_attn_processor(HalfOutput())
    got = run(tm, "pixart")
    assert_same(got, run(transformed(model, "pixart", plan), "pixart"), "set_attn_processor")
    assert_changed(got, before, "the processor must change the output")
    if plan is DEFAULT:
        assert tm.step_counts[StepKind.CACHED] > 0

    tm.set_default_attn_processor()  # AttnProcessor: heads folded into the batch axis
    if plan is DEFAULT:
        with pytest.raises(UnsupportedBlockError, match="AttnProcessor2_0"):
            run(tm, "pixart")
        tm.set_attn_processor(AttnProcessor2_0())
    assert_same(run(tm, "pixart"), before, "the default processor (another kernel)", units=OTHER_KERNELS)


def test_a_change_reaches_every_transformed_model_of_the_same_wrapped_model():
    model = MAKERS["pixart"]()
    a, b = transformed(model, "pixart", DEFAULT), transformed(model, "pixart", CachePlan.no_cache())
    before = run(b, "pixart")
    a.set_attn_processor(HalfOutput())
    assert_changed(run(b, "pixart"), before, "b shares the wrapped model: its graphs must be traced again")
    assert_same(run(b, "pixart"), run(model, "pixart"), "b against the changed model", units=REGROUPED)


def test_methods_the_wrapped_model_lacks_are_absent():
    """Pipelines probe with ``hasattr`` (diffusers' tests call ``set_default_attn_processor`` if present)."""
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4
    ).eval()
    tm = tcpass.transform(dit, CachePlan.no_cache())
    for name in ("set_default_attn_processor", "set_attn_processor", "load_lora_adapter", "peft_config"):
        assert hasattr(tm, name) == hasattr(dit, name), name
    assert hasattr(transformed(MAKERS["sd3"](), "sd3", DEFAULT), "load_lora_adapter")


def test_attention_backend_and_qkv_fusion_after_transform():
    model = MAKERS["flux"]()
    tm = transformed(copy.deepcopy(model), "flux", DEFAULT)
    before = run(tm, "flux")

    tm.set_attention_backend("_native_math")
    assert {p._attention_backend for p in tm.transformer.attn_processors.values()} == {"_native_math"}
    changed = copy.deepcopy(model)
    changed.set_attention_backend("_native_math")
    assert_same(run(tm, "flux"), run(transformed(changed, "flux", DEFAULT), "flux"), "set_attention_backend")
    tm.reset_attention_backend()

    tm.fuse_qkv_projections()
    assert any(hasattr(m, "to_qkv") for m in tm.transformer.modules())
    fused = copy.deepcopy(model)
    fused.fuse_qkv_projections()
    got = run(tm, "flux")
    assert_same(got, run(transformed(fused, "flux", DEFAULT), "flux"), "fuse_qkv_projections")
    assert_same(got, before, "fused projections compute the same", units=OTHER_KERNELS)
    tm.unfuse_qkv_projections()
    assert_same(run(tm, "flux"), before, "unfused", units=OTHER_KERNELS)


def test_a_change_that_raises_leaves_a_working_model():
    model = MAKERS["flux"]()
    tm = transformed(model, "flux", DEFAULT)
    before = run(tm, "flux")
    with pytest.raises(ValueError):
        tm.set_attention_backend("no-such-backend")
    assert_same(run(tm, "flux"), before, "after the refused backend")


def test_weights_changed_in_place_need_no_retrace():
    model = MAKERS["sd3"]()
    tm = transformed(model, "sd3", CachePlan.no_cache())
    before = run(tm, "sd3")
    with torch.no_grad():
        model.proj_out.weight.mul_(0.5)
    got = run(tm, "sd3")
    assert_changed(got, before, "the graphs read the parameters when they run")
    assert_same(got, run(model, "sd3"), "in-place weights", units=REGROUPED)


def _lora_state_dict(model, seed):
    """A LoRA state dict for ``model`` (diffusers' key names, no prefix), made with peft."""
    donor = copy.deepcopy(model)
    torch.manual_seed(seed)
    donor.add_adapter(peft.LoraConfig(**LORA), adapter_name="donor")
    return peft.get_peft_model_state_dict(donor, adapter_name="donor")


@pytest.mark.parametrize("family", ["flux"])  # SD3: tests/test_changes.py::test_switching_fused_loras_needs_no_retrace
def test_lora_lifecycle_after_transform_equals_the_untransformed_model(family):
    """load, weights, fuse, unfuse, delete, unload: under no_cache the transformed model gives what the
    model with the same LoRA state gives, and the default plan runs CACHED steps after every change."""
    model = MAKERS[family]()
    first, second = _lora_state_dict(model, 1), _lora_state_dict(model, 2)
    reference = copy.deepcopy(model)
    tm = transformed(copy.deepcopy(model), family, CachePlan.no_cache())
    cached = tcpass.transform(tm.transformer, DEFAULT, example_inputs=family_inputs(family))
    plain = run(reference, family)

    def two_adapters(m):
        m.load_lora_adapter(second, adapter_name="b", prefix=None)
        m.set_adapters(["a", "b"], weights=[0.7, 0.4])

    changes = [
        ("load_lora_adapter", lambda m: m.load_lora_adapter(first, adapter_name="a", prefix=None)),
        ("a second adapter, set_adapters with weights", two_adapters),
        ("fuse_lora", lambda m: m.fuse_lora(lora_scale=0.8)),
        ("unfuse_lora", lambda m: m.unfuse_lora()),
        ("delete_adapters", lambda m: m.delete_adapters("b")),
        ("unload_lora", lambda m: m.unload_lora()),
    ]
    for what, change in changes:
        change(tm)
        change(reference)
        want = run(reference, family)
        assert_same(run(tm, family), want, what, units=REGROUPED)
        counts = cached.step_counts[StepKind.CACHED]
        run(cached, family, steps=STEPS[:2])  # FULL, CACHED
        assert cached.step_counts[StepKind.CACHED] == counts + 1, what
        if what == "load_lora_adapter":
            assert_changed(want, plain, "the LoRA must change the output")
    assert_same(run(tm, family), plain, "unloaded", units=REGROUPED)
    assert not hasattr(tm, "peft_config")


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_peft_on_a_model_without_lora_methods_then_retrace(family):
    """DiT and PixArt have no diffusers LoRA methods: peft's own API on the wrapped model, then `retrace`;
    under the no-cache plan the model with the same LoRA, and the default plan runs CACHED steps."""
    model = make_dit() if family == "dit" else MAKERS[family]()
    tm = transformed(copy.deepcopy(model), family, CachePlan.no_cache())
    cached = tcpass.transform(tm.transformer, DEFAULT, example_inputs=inputs(family))
    plain = run(tm, family)
    for m in (tm.transformer, model):
        torch.manual_seed(3)
        peft.inject_adapter_in_model(peft.LoraConfig(**LORA), m, adapter_name="a")
    assert_same(run(tm, family), plain, "without retrace the graphs are the ones traced before")
    tm.retrace()  # for every transformed model of tm.transformer: `cached` too
    got = run(tm, family)
    assert_changed(got, plain, "the LoRA must change the output")
    assert_same(got, run(model, family), "after retrace", units=REGROUPED)
    counts = cached.step_counts[StepKind.CACHED]
    assert_changed(run(cached, family), plain, "the cached model's graphs carry the LoRA")
    assert cached.step_counts[StepKind.CACHED] > counts


def test_what_cannot_reach_the_graphs_is_refused_with_the_fix(tmp_path):
    tm = transformed(MAKERS["sd3"](), "sd3", DEFAULT)
    for call, fix in (
        (lambda: tm.enable_layerwise_casting(), r"\.to\(torch\.bfloat16\)"),
        (lambda: tm.enable_group_offload("cpu"), "original model"),
        (lambda: tm.enable_xformers_memory_efficient_attention(), "set_attention_backend"),
        (lambda: tm.compile_repeated_blocks(), "backend='inductor'"),
    ):
        with pytest.raises(NotImplementedError, match=fix):
            call()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tm.save_pretrained(tmp_path, safe_serialization=False, variant="fp16")
    assert any("safetensors" in str(w.message) for w in caught)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "diffusion_pytorch_model.fp16.safetensors" in files and not any(f.endswith(".bin") for f in files)


def test_pipeline_lora_calls_on_a_transformed_pipeline_give_the_pipelines_images():
    """``pipe.load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unload_lora_weights`` on a tiny
    Flux pipeline whose transformer is transformed (no-cache plan): the untransformed pipeline's images."""
    import numpy as np

    from tests.pipelines import CALL, build

    plain, ours = build("flux"), build("flux")
    ours.transformer = tcpass.transform(ours.transformer, CachePlan.no_cache())
    lora = {f"transformer.{k}": v for k, v in _lora_state_dict(plain.transformer, 4).items()}

    def images(pipe):
        out = pipe(
            prompt="a photo of a red car",
            height=8,
            width=8,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **CALL["flux"],
        )
        return np.asarray(out.images)

    before = images(plain)
    for what, change in (
        ("load_lora_weights", lambda p: p.load_lora_weights(dict(lora), adapter_name="x")),
        ("set_adapters", lambda p: p.set_adapters(["x"], adapter_weights=[0.6])),
        ("fuse_lora", lambda p: p.fuse_lora(components=["transformer"], lora_scale=0.9)),
        ("unfuse_lora", lambda p: p.unfuse_lora(components=["transformer"])),
        ("unload_lora_weights", lambda p: p.unload_lora_weights()),
    ):
        change(plain)
        change(ours)
        want = images(plain)
        assert_close(images(ours), want, units=REGROUPED, what=what)
        if what == "load_lora_weights":
            assert np.abs(want - before).max() > 1e-3, "the LoRA must change the images"
    assert_close(images(ours), before, units=REGROUPED, what="after unloading")


def test_switching_fused_loras_needs_no_retrace():
    """A merged LoRA layer runs its base layer alone, whose weights the graphs read when they run:
    unfuse, pick another adapter, fuse again, and the graphs traced for the first fused state serve."""
    model = MAKERS["sd3"]()
    first, second = _lora_state_dict(model, 1), _lora_state_dict(model, 2)
    reference = copy.deepcopy(model)
    tm = transformed(copy.deepcopy(model), "sd3", DEFAULT)
    for m in (tm, reference):
        m.load_lora_adapter(first, adapter_name="a", prefix=None)
        m.load_lora_adapter(second, adapter_name="b", prefix=None)
        m.set_adapters(["a"])
        m.fuse_lora()
    assert_same(run(tm, "sd3", STEPS[:1]), run(reference, "sd3", STEPS[:1]), "fused a", units=REGROUPED)
    graphs = tm.step_graphs()
    for m in (tm, reference):
        m.unfuse_lora()
        m.set_adapters(["b"], weights=[0.6])
        m.fuse_lora()
    got = run(tm, "sd3", STEPS[:1])
    assert tm.step_graphs() is graphs, "switching fused adapters must not re-trace"
    assert_same(got, run(reference, "sd3", STEPS[:1]), "fused b", units=REGROUPED)
    tm.unfuse_lora()  # unmerged: the graphs must now compute the LoRA branch, so they are traced again
    reference.unfuse_lora()
    assert_same(run(tm, "sd3", STEPS[:1]), run(reference, "sd3", STEPS[:1]), "unfused b", units=REGROUPED)
    assert tm.step_graphs() is not graphs


def test_model_cpu_offload_runs_and_sequential_offload_is_refused():
    """With accelerate, on the CPU as far as it allows (``device="cpu"``): model offload's hook calls
    ``.to(device)`` before every forward, which changes nothing here and must not re-trace; sequential
    offload leaves the weights on the meta device, read per layer by hooks the graphs never call."""
    import numpy as np

    from tests.pipelines import build

    def images(pipe):
        out = pipe(
            class_labels=[1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        return np.asarray(out.images)

    plain, ours = build("dit"), build("dit")
    ours.transformer = tm = tcpass.transform(ours.transformer, DEFAULT)
    want = images(ours)
    graphs = tm.step_graphs()
    ours.enable_model_cpu_offload(device="cpu")
    assert_close(images(ours), want, units=EXACT, what="model CPU offload")
    assert tm.step_graphs() is graphs, "a .to() that changes nothing must not re-trace"

    plain.transformer = tcpass.transform(plain.transformer, DEFAULT)
    plain.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(RuntimeError, match="enable_model_cpu_offload"):
        images(plain)
