"""Training loss of VAR: token cross-entropy with optional label smoothing and per-scale weights."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["scale_token_weights", "var_loss", "token_accuracy", "token_accuracy_tensor"]


def scale_token_weights(patch_nums: Sequence[int], scale_weights: Optional[Sequence[float]] = None,
                        device=None) -> torch.Tensor:
    """Per-token loss weights (1, L) that sum to 1.

    Every token of scale si gets ``scale_weights[si]`` before normalisation. Without ``scale_weights`` all tokens
    weigh 1/L, which is the official loss (a plain token mean, so large scales dominate by token count).
    """
    patch_nums = tuple(patch_nums)
    if scale_weights is None:
        scale_weights = [1.0] * len(patch_nums)
    scale_weights = [float(w) for w in scale_weights]
    if len(scale_weights) != len(patch_nums):
        raise ValueError(f"scale_weights must have one entry per scale ({len(patch_nums)}), got {len(scale_weights)}")
    if any(w < 0 for w in scale_weights) or sum(scale_weights) <= 0:
        raise ValueError(f"scale_weights must be >= 0 with a positive sum, got {scale_weights}")
    w_L = torch.cat([torch.full((pn * pn,), w, dtype=torch.float32, device=device)
                     for pn, w in zip(patch_nums, scale_weights)])
    return (w_L / w_L.sum()).view(1, -1)


def var_loss(logits_BLV: torch.Tensor, gt_BL: torch.Tensor, token_weight_1L: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Weighted cross-entropy: per-token CE (with ``label_smoothing``) times ``token_weight_1L``, summed over the
    tokens and averaged over the batch. Computed in float32."""
    if logits_BLV.ndim != 3 or tuple(gt_BL.shape) != tuple(logits_BLV.shape[:2]):
        raise ValueError(f"logits_BLV (B, L, V) and gt_BL (B, L) disagree: {tuple(logits_BLV.shape)} vs "
                         f"{tuple(gt_BL.shape)}")
    if tuple(token_weight_1L.shape) != (1, logits_BLV.shape[1]):
        raise ValueError(f"token_weight_1L must be (1, {logits_BLV.shape[1]}), got {tuple(token_weight_1L.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    B, L, V = logits_BLV.shape
    ce_BL = F.cross_entropy(logits_BLV.float().reshape(-1, V), gt_BL.reshape(-1), reduction="none",
                            label_smoothing=label_smoothing).view(B, L)
    return ce_BL.mul(token_weight_1L).sum(dim=-1).mean()


@torch.no_grad()
def token_accuracy_tensor(logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens whose argmax logit is the ground truth, in percent: a 0-dim float32 tensor on the logits'
    device (nothing is read on the host)."""
    return (logits_BLV.argmax(dim=-1) == gt_BL).float().mean() * 100


def token_accuracy(logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> float:
    """:func:`token_accuracy_tensor` as a Python float."""
    return token_accuracy_tensor(logits_BLV, gt_BL).item()
