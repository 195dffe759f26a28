"""Datasets for VAR training: an ImageNet-style image folder (official preprocessing) and pre-tokenised pyramids."""
import os
import random
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["ImageFolder", "TokenPyramids", "split_scales", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageFolder(Dataset):
    """``root/<class name>/<image>`` files -> (image (3, reso, reso) in [-1, 1], class index).

    As the official data pipeline: the shorter side is resized to round(1.125 * reso) with LANCZOS, then a random
    (``train``) or centre crop of ``reso``; no flip. Classes are the sorted sub-folder names.
    """

    def __init__(self, root: Union[str, os.PathLike], reso: int, train: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root must be a directory of class folders, got {root}")
        if not isinstance(reso, int) or reso < 1:
            raise ValueError(f"reso must be a positive int, got {reso!r}")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples: List[Tuple[Path, int]] = [
            (f, ci) for ci, c in enumerate(self.classes) for f in sorted((root / c).rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"root {root} holds no images in class sub-folders")
        self.reso, self.train = reso, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = Image.open(path).convert("RGB")
        short = round(1.125 * self.reso)
        w, h = img.size
        # shorter side to `short`, longer side scaled and truncated (as torchvision's Resize(int))
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, Image.LANCZOS)
        w, h = img.size
        if self.train:
            left, top = random.randint(0, w - self.reso), random.randint(0, h - self.reso)
        else:
            left, top = (w - self.reso) // 2, (h - self.reso) // 2
        img = img.crop((left, top, left + self.reso, top + self.reso))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        return arr.div_(127.5).sub_(1.0), label


class TokenPyramids(Dataset):
    """Pre-tokenised training data: a file (``torch.save``) or dict with ``idx_BL`` (N, L) LongTensor (all scales
    concatenated, as ``torch.cat(vae.img_to_idxBl(img), dim=1)``) and ``labels`` (N,). Items are (idx_L, label)."""

    def __init__(self, source: Union[str, os.PathLike, dict]):
        data = source if isinstance(source, dict) else torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or "idx_BL" not in data or "labels" not in data:
            raise ValueError("source must hold a dict with 'idx_BL' (N, L) and 'labels' (N,)")
        self.idx_BL = torch.as_tensor(data["idx_BL"]).long()
        self.labels = torch.as_tensor(data["labels"]).long()
        if self.idx_BL.ndim != 2 or tuple(self.labels.shape) != (self.idx_BL.shape[0],):
            raise ValueError(f"idx_BL must be (N, L) and labels (N,), got {tuple(self.idx_BL.shape)} and "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.idx_BL.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.idx_BL[i], self.labels[i]


def split_scales(idx_BL: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """Split concatenated tokens (B, L) into one (B, pn^2) tensor per scale."""
    sizes = [pn * pn for pn in patch_nums]
    if idx_BL.ndim != 2 or idx_BL.shape[1] != sum(sizes):
        raise ValueError(f"idx_BL must be (B, {sum(sizes)}) for patch_nums {tuple(patch_nums)}, "
                         f"got {tuple(idx_BL.shape)}")
    return list(idx_BL.split(sizes, dim=1))
