"""Few-row float32 linear layer for cached decoding (``PARSampler(fast=True)``), with a pure-PyTorch reference.

A decoding step multiplies 1-64 rows by each weight matrix once; the CPU kernel (``csrc/linear``) reads the weight
from a layout packed once, ``(ceil(N / 64), K, 64)`` column panels, and is about 1.8x faster than ``F.linear`` at
32 rows and 2.4x at 8 rows on this project's CPU (``benchmarks/bench_par.py``, ``docs/par.md``).

    packed = decode_linear_pack(weight)           # weight (N, K) float32, once
    y = decode_linear(x, packed, weight.shape[0])  # x (R, K) -> x @ weight.T, (R, N)
    y = decode_linear_rmsnorm(x, packed, weight.shape[0], norm_weight, eps)  # F.rms_norm(x, ...) @ weight.T

The fused RMSNorm exists because after a projection has streamed its weights through the caches, every small op
that follows runs on cold caches (~100 us each here, against ~20 us warm), and an unfused RMSNorm is about eight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from varcore.ops import extension

__all__ = ["PANEL", "decode_linear_pack", "decode_linear", "decode_linear_rmsnorm", "decode_linear_pack_ref",
           "decode_linear_ref", "decode_linear_rmsnorm_ref"]

PANEL = 64  # columns per packed panel (csrc/linear/linear.h kPanel)
_PACK = extension.register_op("decode_linear_pack")
_LINEAR = extension.register_op("decode_linear")
_LINEAR_RMSNORM = extension.register_op("decode_linear_rmsnorm")


def _check(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def decode_linear_pack_ref(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) -> (ceil(N / 64), K, 64): panel p, row k holds weight[64 p + j, k], zeros past N."""
    N, K = weight.shape
    P = -(-N // PANEL)
    padded = F.pad(weight, (0, 0, 0, P * PANEL - N))
    return padded.view(P, PANEL, K).transpose(1, 2).contiguous()


def decode_linear_ref(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (R, K) @ the packed weight's transpose, the first ``out_features`` columns."""
    P, K, _ = packed.shape
    return (x @ packed.transpose(0, 1).reshape(K, P * PANEL))[:, :out_features]


def decode_linear_rmsnorm_ref(x: torch.Tensor, packed: torch.Tensor, out_features: int, norm_weight: torch.Tensor,
                              eps: float) -> torch.Tensor:
    """:func:`decode_linear_ref` of ``x * rsqrt(mean(x^2, -1) + eps) * norm_weight``."""
    return decode_linear_ref(F.rms_norm(x, (x.shape[1],), norm_weight, eps), packed, out_features)


def decode_linear_pack(weight: torch.Tensor) -> torch.Tensor:
    """Pack a float32 weight (N, K) for :func:`decode_linear`."""
    _check("weight", weight, 2)
    if extension.use_kernel("decode_linear_pack", weight.device):
        return torch.ops.varcore.decode_linear_pack(weight)
    return decode_linear_pack_ref(weight)


def _check_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> None:
    _check("x", x, 2)
    _check("packed", packed, 3)
    if packed.shape[2] != PANEL:
        raise ValueError(f"packed must come from decode_linear_pack (last dim {PANEL}), got {tuple(packed.shape)}")
    if packed.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} input features, the packed weight {packed.shape[1]}")
    if not (packed.shape[0] - 1) * PANEL < out_features <= packed.shape[0] * PANEL:
        raise ValueError(f"out_features={out_features} does not match the packed width {packed.shape[0] * PANEL}")


def decode_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ weight.T`` (R, out_features) for x (R, K) and ``packed = decode_linear_pack(weight)``."""
    _check_linear(x, packed, out_features)
    if extension.use_kernel("decode_linear", x.device):
        return torch.ops.varcore.decode_linear(x, packed, out_features)
    return decode_linear_ref(x, packed, out_features)


def decode_linear_rmsnorm(x: torch.Tensor, packed: torch.Tensor, out_features: int, norm_weight: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """``F.rms_norm(x, (K,), norm_weight, eps) @ weight.T`` in one call (the norm accumulated in float64 in the
    kernel, so it agrees with ``F.rms_norm`` to float32 rounding, not bit for bit)."""
    _check_linear(x, packed, out_features)
    _check("norm_weight", norm_weight, 1)
    if norm_weight.shape[0] != x.shape[1]:
        raise ValueError(f"norm_weight must have x's {x.shape[1]} features, got {tuple(norm_weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if extension.use_kernel("decode_linear_rmsnorm", x.device):
        return torch.ops.varcore.decode_linear_rmsnorm(x, packed, out_features, norm_weight, float(eps))
    return decode_linear_rmsnorm_ref(x, packed, out_features, norm_weight, eps)
