"""The digits classifier of the quality harness: a small CNN whose penultimate layer is the feature space of the
Fréchet distance (as Inception's pool features are for FID)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from varcore.digits.data import NUM_CLASSES

__all__ = ["DigitClassifier"]


class DigitClassifier(nn.Module):
    """Two conv-ReLU-maxpool stages, a ``feature_dim`` ReLU layer (the features), and a linear 10-way head.

    Inputs are images (B, 3, H, W) or (B, 1, H, W) in [-1, 1] (channels are averaged: the digits are grey), H and W
    divisible by 4 (16 for the bundled data).
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, image_size: int = 16):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.float().mean(dim=1, keepdim=True)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10)."""
        return self.head(self.features(images))
