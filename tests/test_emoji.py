"""The emoji reference model: shipped files, data plumbing, training determinism, the demo on it.

Nothing here needs npm or the network: the tests use the files shipped in tcpass/zoo.
"""

import pytest
import torch

import tcpass
from tcpass.metrics import class_accuracy
from tcpass.zoo import REFERENCE_MODELS, emoji, reference
from tcpass.zoo.demo import format_table, run_demo, save_grid
from tcpass.zoo.train_emoji import augment, train_dit


def test_shipped_files_are_safetensors_within_size_limits():
    files = list(emoji.reference_model_dir().iterdir())
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == 1 and {f.suffix for f in files} <= {".safetensors", ".json"}
    assert weights[0].stat().st_size <= 40 * 2**20
    assert emoji.classifier_path().stat().st_size <= 2 * 2**20
    assert emoji.held_out_path().stat().st_size <= 2 * 2**20
    zoo = emoji.reference_model_dir().parent
    assert not [f for f in zoo.rglob("*") if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert (zoo / "EMOJI_NOTICE").is_file()


def test_registry_row_matches_the_shipped_model():
    ref = reference("emoji")
    model = ref.load_model(None)
    cfg = model.config
    assert (cfg.in_channels, cfg.sample_size, cfg.sample_size) == ref.image_shape == (3, 32, 32)
    assert cfg.sample_size // cfg.patch_size == 16  # 256 tokens per image
    assert cfg.num_embeds_ada_norm == ref.num_classes == ref.null_label == 9
    assert ref.class_names[ref.num_classes - 1] == "flags" and "emoji" in REFERENCE_MODELS


def test_held_out_set_shapes_ranges_and_classes():
    images, labels = reference("emoji").held_out()
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32 and len(labels) == len(images)
    assert 300 <= len(images) <= 500
    assert images.min() >= -1 and images.max() <= 1 and images.max() == 1  # white backgrounds
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(9))


def test_classifier_recognises_held_out_categories():
    images, labels = reference("emoji").held_out()
    assert class_accuracy(images, labels, emoji.load_classifier()) >= 0.6
    assert emoji.load_classifier().features(images[:4]).shape == (4, 128)


def test_shipped_model_generates_deterministically_for_a_seed():
    model = emoji.load_reference_model()
    from tcpass.sampling import ddim_sample

    def sample(seed):
        noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        return ddim_sample(model, noise, torch.tensor([0, 8]), emoji.NULL_LABEL, num_steps=3, guidance_scale=4.0)

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and (a - c).abs().max() > 0.1
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()


def _tiny_training(seed, autocast=None):
    tiny = dict(emoji.DIT_CONFIG, num_attention_heads=2, attention_head_dim=16, num_layers=1, norm_num_groups=8)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 32, 32, generator=g) * 2 - 1
    labels = torch.arange(12) % 3
    model, losses = train_dit(
        images, labels, tiny, steps=2, batch=4, warmup=1, seed=seed, progress=False, autocast=autocast
    )
    return model.state_dict(), losses


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_training_is_deterministic_for_a_seed(autocast):
    (a, loss_a), (b, loss_b), (c, _) = (_tiny_training(s, autocast) for s in (0, 0, 1))
    assert loss_a == loss_b and len(loss_a) == 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())  # mixed precision keeps float32 weights


def test_bf16_autocast_changes_the_forward_numerics():
    (a, loss_a), (b, loss_b) = _tiny_training(0), _tiny_training(0, torch.bfloat16)
    assert loss_a != loss_b and abs(loss_a[0] - loss_b[0]) < 0.05 * loss_a[0]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_augment_flips_and_shifts_with_a_white_border():
    g = torch.Generator().manual_seed(0)
    images = -torch.ones(64, 3, 32, 32)
    out = augment(images, g, max_shift=2)
    assert out.shape == images.shape
    assert (out == 1).any() and (out == -1).any()  # white enters where the image was shifted


def test_missing_npm_is_reported_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TCPASS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm.*emoji-datasource-google@16.0.0"):
        emoji.tarball()


def test_shipped_plan_fits_the_model():
    ref = reference("emoji")
    graphs = tcpass.transform(ref.load_model(None), tcpass.load_plan(ref.default_plan)).step_graphs()
    assert graphs.num_tokens == 256 and len(graphs.blocks) == 8


def test_demo_runs_end_to_end_on_emoji(tmp_path):
    result = run_demo("emoji", steps=3, rounds=1, progress=False)
    assert result.full_images.shape == result.cached_images.shape == (9, 3, 32, 32)
    assert result.class_names[0] == "smileys" and len(result.psnr_db) == 9
    assert "tcpass" in format_table(result)
    path = save_grid(result, tmp_path / "grid.png")
    assert path.stat().st_size > 1000
