"""Quality metrics: fidelity of a cached generation to the full-compute one, and sample quality.

Images are tensors [B, C, H, W] in [-1, 1] (``data_range`` 2). PSNR and SSIM come from
scikit-image; the Fréchet distance is the standard formula over classifier features.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _numpy_images(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] -> [B, H, W, C] float64; packed latents [B, N, C] (Flux) stay [B, N, C]."""
    images = images.detach().cpu().double()
    return (images.permute(0, 2, 3, 1) if images.ndim == 4 else images).numpy()


def psnr(test: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> np.ndarray:
    """PSNR in dB of each image of ``test`` against ``reference`` (inf where identical)."""
    a, b = _numpy_images(test), _numpy_images(reference)
    out = []
    for x, y in zip(a, b, strict=True):
        out.append(np.inf if np.array_equal(x, y) else peak_signal_noise_ratio(y, x, data_range=data_range))
    return np.array(out)


def ssim(test: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> np.ndarray:
    """SSIM (1 = identical) of each image of ``test`` against ``reference``."""
    a, b = _numpy_images(test), _numpy_images(reference)
    return np.array(
        [structural_similarity(y, x, data_range=data_range, channel_axis=-1) for x, y in zip(a, b, strict=True)]
    )


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: torch.nn.Module) -> float:
    """Fraction of ``images`` the classifier assigns to their intended ``labels``."""
    return (classifier(images).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: torch.nn.Module) -> np.ndarray:
    return classifier.features(images).double().numpy()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n, d]."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def bootstrap_draws(num_samples: int, draws: int = 100, seed: int = 0) -> np.ndarray:
    """``draws`` resamplings (with replacement) of ``num_samples`` sample indices, [draws, num_samples].

    Give every variant the same draws: their samples share noise and conditioning, so a difference
    of two variants' replicates is a paired bootstrap of their difference.
    """
    return np.random.default_rng(seed).integers(0, num_samples, size=(draws, num_samples))


def frechet_bootstrap(features: np.ndarray, reference: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The Fréchet distance of ``features[d]`` to ``reference`` for every resampling ``d`` of ``draws``
    (`bootstrap_draws`): its spread is the sampling noise of `frechet_distance` at this sample count."""
    if draws.max(initial=0) >= len(features):
        raise ValueError(f"draws index up to {draws.max()} but there are {len(features)} samples.")
    return np.array([frechet_distance(features[d], reference) for d in draws])
