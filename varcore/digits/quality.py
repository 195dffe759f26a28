"""Quality harness on the digits task: class consistency and a Fréchet distance in the classifier's feature space.

* **Class consistency**: the fraction of generated images that the bundled digit classifier (98.9% accurate on
  the held-out test digits) assigns to the class they were generated for.
* **Fréchet distance**: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between Gaussians fitted to the
  classifier's 64-d penultimate features of two image sets (FID's formula in a digits feature space). The
  reference set is the held-out test split, which no bundled model was trained on.

Images are (N, 3 or 1, H, W) floats in [0, 1] (the samplers' output) unless noted.
"""

import numpy as np
import torch

from varcore.digits.data import load_digits

__all__ = ["load_classifier", "classifier_features", "class_consistency", "frechet_distance",
           "reference_features"]


def load_classifier(device="cpu", weights_root=None):
    """The bundled :class:`~varcore.digits.classifier.DigitClassifier` (eval mode)."""
    from varcore.digits.recipe import load_weights

    return load_weights("classifier", root=weights_root, device=device)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be a (N, 1 or 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image")
    return images


@torch.no_grad()
def _in_chunks(classifier, method: str, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``classifier.<method>`` over ``images`` in [-1, 1], ``chunk`` at a time on the classifier's device."""
    device = next(classifier.parameters()).device
    fn = getattr(classifier, method)
    return torch.cat([fn(x.to(device)).cpu() for x in images.split(chunk)])


def classifier_features(classifier, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features (N, 64) of images in [0, 1]."""
    images = _check_images(images)
    return _in_chunks(classifier, "features", images.float() * 2 - 1)


def class_consistency(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction in [0, 1] of ``images`` (in [0, 1]) classified as their ``labels``."""
    images = _check_images(images)
    labels = torch.as_tensor(labels).cpu().long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    pred = _in_chunks(classifier, "forward", images.float() * 2 - 1).argmax(dim=1)
    return (pred == labels).float().mean().item()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D), in float64.

    The trace of ``(S_a S_b)^(1/2)`` is computed as the sum of square roots of the eigenvalues of the symmetric
    ``S_a^(1/2) S_b S_a^(1/2)`` (same spectrum, and no complex round-off as with a general matrix square root).
    """
    a = np.asarray(torch.as_tensor(feats_a).double().cpu())
    b = np.asarray(torch.as_tensor(feats_b).double().cpu())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 rows to estimate a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def reference_features(classifier, split: str = "test") -> torch.Tensor:
    """Features of the real digits of ``split`` (the Fréchet reference set)."""
    images, _ = load_digits(split)
    return classifier_features(classifier, images.add(1).mul(0.5))
