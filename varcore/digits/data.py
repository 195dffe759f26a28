"""The digits data set: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), upscaled.

It ships inside scikit-learn (the optional extra ``pip install 'varcore[digits]'``), so no download is ever needed
to train or evaluate the bundled models. Sampling them needs no scikit-learn: only the training recipe, the quality
harness and the probe read the data.

Images are returned as float tensors (N, 3, size, size) in [-1, 1] (the grey value repeated in three channels, as
the VAR and LlamaGen tokenizers expect RGB), with ink bright on a dark background. The split is fixed: a
permutation drawn from ``SPLIT_SEED`` puts ``TEST_FRACTION`` of every class in the test split.
"""
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMAGE_SIZE", "NUM_CLASSES", "load_digits", "augment", "SPLITS"]

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLITS = ("train", "test", "all")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
DIGITS_EXTRA_HINT = ("the digits data set (training, quality harness, probe) comes from scikit-learn: "
                     "pip install 'varcore[digits]'")


def _raw_digits() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError(DIGITS_EXTRA_HINT) from e
    bunch = sk_load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def _split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Stratified, fixed train/test indices (sorted)."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        test.extend(rng.permutation(members)[: round(TEST_FRACTION * len(members))])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test] = True
    if split == "test":
        return np.flatnonzero(test_mask)
    if split == "train":
        return np.flatnonzero(~test_mask)
    return np.arange(len(labels))


def load_digits(split: str = "train", size: int = IMAGE_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Digits of ``split`` ('train', 'test' or 'all') as (images (N, 3, size, size) in [-1, 1], labels (N,)).

    The 8x8 images are upscaled with bilinear interpolation (antialiased, align_corners=False) to ``size``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    images, labels = _raw_digits()
    idx = _split_indices(labels, split)
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).mul(2).sub(1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels[idx])


def augment(images: torch.Tensor, generator: Optional[torch.Generator] = None, max_shift: int = 1) -> torch.Tensor:
    """Light augmentation: each image is shifted by up to ``max_shift`` pixels in x and y (the border filled with
    the background value -1). Deterministic for a given ``generator`` state."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if max_shift == 0:
        return images
    N, _, H, W = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p), value=-1.0)
    shifts = torch.randint(0, 2 * p + 1, (N, 2), generator=generator)
    # gather each image's window with index arithmetic (one op for the whole batch)
    rows = (shifts[:, 0, None] + torch.arange(H))[:, :, None].expand(N, H, W)
    cols = (shifts[:, 1, None] + torch.arange(W))[:, None, :].expand(N, H, W)
    flat = rows * (W + 2 * p) + cols
    out = padded.flatten(2).gather(2, flat.flatten(1)[:, None, :].expand(-1, images.shape[1], -1))
    return out.view_as(images)
