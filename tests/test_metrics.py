"""Metrics give known answers on constructed inputs."""

import math

import numpy as np
import pytest
import torch

from tcpass.metrics import bootstrap_draws, frechet_bootstrap, frechet_distance, psnr, ssim


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert np.isinf(psnr(x, x)).all()
    assert np.allclose(ssim(x, x), 1.0)


def test_known_noise_level_gives_expected_psnr():
    g = torch.Generator().manual_seed(0)
    ref = torch.zeros(4, 1, 64, 64)
    sigma = 0.1
    noisy = ref + sigma * torch.randn(ref.shape, generator=g)
    expected = 10 * math.log10(2.0**2 / sigma**2)  # data range 2 ([-1, 1] images): 26.02 dB
    assert np.allclose(psnr(noisy, ref), expected, atol=0.1)
    assert (ssim(noisy, ref) < 0.9).all()


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 4))
    b = rng.standard_normal((20000, 4)) + np.array([3.0, 0, 0, 0])
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a, b) - 9.0) < 0.2


def test_frechet_bootstrap_resamples_the_samples_and_pairs_variants():
    rng = np.random.default_rng(1)
    real, a = rng.standard_normal((400, 3)), rng.standard_normal((200, 3)) + 0.5
    draws = bootstrap_draws(200, draws=30, seed=2)
    assert draws.shape == (30, 200) and np.array_equal(draws, bootstrap_draws(200, draws=30, seed=2))
    boot = frechet_bootstrap(a, real, draws)
    # the bootstrap calls frechet_distance on the drawn rows: the same computation, bit-identical
    assert boot[0] == frechet_distance(a[draws[0]], real)
    assert frechet_bootstrap(a, real, np.arange(200)[None])[0] == frechet_distance(a, real)
    assert 0 < boot.std() < 0.5 and abs(boot.mean() - frechet_distance(a, real)) < 0.2
    with pytest.raises(ValueError, match="200 samples"):
        frechet_bootstrap(a, real, np.full((1, 5), 200))
