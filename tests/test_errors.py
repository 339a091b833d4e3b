"""Bad input to transform gets a clear error and leaves the model untouched."""

import pytest
import torch

import tcpass
from tcpass import CachePlan, ModelFingerprint
from tests.conftest import dit_inputs


def assert_untouched(model, state, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with torch.no_grad():  # the same eager model on the same inputs in one process: bit-identical
        assert torch.equal(model(**dit_inputs()).sample, before)


@pytest.mark.parametrize(
    "plan, error, match",
    [
        (CachePlan(blocks=(0, 5)), ValueError, r"plan.blocks\[1\] = 5 but the model has 3 transformer blocks \(0..2\)"),
        (CachePlan(block_keep_ratio={9: 0.5}), ValueError, r"block_keep_ratio names block 9 .* \(0..2\)"),
        (
            CachePlan(model=ModelFingerprint("DiTTransformer2DModel", 28, 1152)),
            ValueError,
            "made for another model",
        ),
        ({"blocks": "all"}, TypeError, "plan must be a tcpass.CachePlan"),
    ],
)
def test_bad_plan_for_model(dit, plan, error, match):
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    with torch.no_grad():
        before = dit(**dit_inputs()).sample
    with pytest.raises(error, match=match):
        tcpass.transform(dit, plan)
    assert_untouched(dit, state, before)


def test_unsupported_model_lists_supported_families():
    with pytest.raises(
        TypeError,
        match=r"does not support Linear; supported model classes: \['CogVideoXTransformer3DModel', "
        r"'DiTTransformer2DModel', 'FluxTransformer2DModel', 'HunyuanVideoTransformer3DModel', "
        r"'LTXVideoTransformer3DModel', 'PixArtTransformer2DModel', 'SD3Transformer2DModel', "
        r"'WanTransformer3DModel'\]\. To add a family",
    ):
        tcpass.transform(torch.nn.Linear(4, 4), CachePlan())


def test_unsupported_call_argument(dit):
    tm = tcpass.transform(dit, CachePlan())
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        tm(**dit_inputs(), cross_attention_kwargs={"scale": 0.5})


def test_missing_static_scores_file(dit, tmp_path):
    selector = tcpass.SelectorSpec(kind="static", path=str(tmp_path / "missing.safetensors"), sha256="0" * 64)
    plan = CachePlan(selector=selector)
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        tcpass.transform(dit, plan)


def test_tampered_static_scores_are_rejected(dit, tmp_path):
    from tcpass.selectors import StaticScoreSelector

    path = tmp_path / "s.safetensors"
    StaticScoreSelector(torch.randn(3, 2, 64), torch.tensor([900.0, 100.0]), torch.arange(3)).save(path)
    plan = CachePlan(selector=tcpass.SelectorSpec(kind="static", path=str(path), sha256="0" * 64))
    with pytest.raises(ValueError, match="does not match the plan's selector.sha256"):
        tcpass.transform(dit, plan)
