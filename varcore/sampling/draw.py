"""The draws of every sampler: logit filters (top-k, top-p), multinomial and inverse-CDF draws, Gumbel softmax,
guidance and temperature, and the checks of their arguments.

They mirror the official ``models/helpers.py`` semantics, including in-place filtering and the exact sequence of
random draws, so that the same generator state gives the same tokens.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["top_k_top_p_filter_", "sample_with_top_k_top_p_", "gumbel_softmax_with_rng", "inverse_cdf_sample",
           "check_cfg", "check_top_k", "temper", "nonfinite_rows", "raise_if_nonfinite", "check_images_finite"]


def check_cfg(cfg, name: str = "cfg") -> float:
    """A guidance weight: a finite number >= 0 (0 turns guidance off)."""
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(cfg).__name__}")
    if not (math.isfinite(cfg) and cfg >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {cfg}")
    return float(cfg)


def check_top_k(top_k, V: int) -> int:
    """An int in [0, V] (0 disables top-k; V keeps every code, as official; more is an error there too)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 0 <= top_k <= V:
        raise ValueError(f"top_k must be in [0, V={V}] (0 disables it), got {top_k}")
    return top_k


def temper(logits_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits_NV / temperature`` (a new tensor unless the temperature is 1), with the limit where that overflows.

    A small temperature can push a row of finite logits past float32's range (+inf, or -inf everywhere), whose
    softmax is NaN. Such rows take the value the draw tends to as the temperature goes to 0: ``(logits - max) /
    temperature``, zero at the row's maximum and -inf (or hugely negative) elsewhere, so the draw is greedy
    (uniform over exact ties). Rows that do not overflow are the plain quotient, bit for bit.
    """
    if temperature == 1.0:
        return logits_NV
    scaled = logits_NV / temperature
    if temperature >= 1.0:  # |x / t| <= |x|: nothing can overflow
        return scaled
    max_N1 = logits_NV.amax(dim=-1, keepdim=True)
    overflow_N1 = torch.isfinite(max_N1) & ~torch.isfinite(scaled.amax(dim=-1, keepdim=True))
    return torch.where(overflow_N1, (logits_NV - max_N1) / temperature, scaled)


def nonfinite_rows(logits_NV: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows holding a NaN or a +inf, or nothing but -inf (no code left to draw). -inf alone marks a
    filtered-out code. One reduction, no host synchronisation (a sampler checks the flags once per call)."""
    return ~torch.isfinite(logits_NV.amax(dim=-1))


NONFINITE_HINT = ("NaN or inf in the model's weights or activations (a diverged or damaged checkpoint), or a cfg "
                  "scale so large that (1 + cfg) * cond - cfg * uncond overflows float32")


def raise_if_nonfinite(flags: torch.Tensor, what: str, cfg: Optional[float] = None) -> None:
    """Raise a ValueError when any of ``flags`` (bool, any shape) is set: the logits of ``what`` were not finite.
    The one host synchronisation of a sampler's check; call it once per call, after the loop."""
    if bool(flags.any()):
        at = "" if cfg is None else f" (cfg={cfg:g})"
        raise ValueError(f"the logits of {what} are not finite{at}: {NONFINITE_HINT}. Nothing was returned, "
                         f"since the draws would be arbitrary tokens (token 0 everywhere).")


def check_images_finite(img: torch.Tensor, what: str) -> torch.Tensor:
    """``img``, or a ValueError when a pixel is NaN or inf (a non-finite code vector or decoder weight)."""
    if not bool(torch.isfinite(img).all()):
        raise ValueError(f"the images decoded by {what} hold NaN or inf: a non-finite codebook entry or decoder "
                         f"weight (check the VQVAE checkpoint)")
    return img


def _check_top_k_top_p(top_k: int, top_p: float, V: int) -> None:
    check_top_k(top_k, V)
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool):
        raise TypeError(f"top_p must be a float, got {type(top_p).__name__}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0 disables it), got {top_p}")


def top_k_top_p_filter_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set filtered-out logits to -inf in place and return ``logits_BlV``.

    top-k keeps every logit >= the k-th largest (ties at the threshold survive; k >= V keeps all). top-p then sorts
    ascending, computes the cumulative softmax of the top-k-filtered logits and removes the positions whose
    cumulative mass is <= 1 - top_p; the largest logit is always kept.
    """
    V = logits_BlV.shape[-1]
    _check_top_k_top_p(top_k, top_p, V)
    if 0 < top_k < V:
        kth_largest = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_largest, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_to_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_to_remove[..., -1:] = False
        logits_BlV.masked_fill_(sorted_to_remove.scatter(-1, sorted_idx, sorted_to_remove), -torch.inf)
    return logits_BlV


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                             rng: Optional[torch.Generator] = None, num_samples: int = 1) -> torch.Tensor:
    """Filter ``logits_BlV`` (B, l, V) in place with top-k/top-p, then draw from the softmax: (B, l, |num_samples|).

    ``num_samples >= 0`` draws with replacement, a negative value draws |num_samples| without replacement. One
    ``torch.multinomial`` call over all B*l rows consumes the generator (``rng``, or the global one when None).
    """
    if logits_BlV.ndim != 3:
        raise ValueError(f"logits_BlV must be (B, l, V), got {tuple(logits_BlV.shape)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples == 0:
        raise ValueError(f"num_samples must be a non-zero int, got {num_samples!r}")
    B, l, V = logits_BlV.shape
    if torch.isnan(logits_BlV).any() or torch.isposinf(logits_BlV).any():  # -inf is a filtered-out code
        raise ValueError(f"logits_BlV must not hold NaN or +inf: {NONFINITE_HINT}")
    top_k_top_p_filter_(logits_BlV, top_k=top_k, top_p=top_p)
    probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
    idx = torch.multinomial(probs_NV, num_samples=abs(num_samples), replacement=num_samples >= 0, generator=rng)
    return idx.view(B, l, abs(num_samples))


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float = 1.0, hard: bool = False, eps: float = 1e-10,
                            dim: int = -1, rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gumbel-softmax whose noise comes from ``rng`` (``F.gumbel_softmax`` and the global RNG when None).

    The noise is ``-log(Exp(1))`` from one ``exponential_`` draw over ``logits``' shape; ``hard`` returns the
    straight-through one-hot. ``eps`` is only used by the ``rng=None`` path, as in PyTorch.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if rng is None:
        return F.gumbel_softmax(logits=logits, tau=tau, hard=hard, eps=eps, dim=dim)
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def inverse_cdf_sample(weights_NV: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw per row of ``weights_NV`` (N, V) (non-negative, need not sum to 1): (N, 1) int64 indices.

    Same distribution as ``torch.multinomial(weights_NV, 1)`` but a different use of the generator: one uniform
    float64 per row, inverted through the row's float64 cumulative sum. ``multinomial`` draws one exponential per
    entry (argmax of p / Exp(1)), which on a CPU costs far more than the rest of a few-row decoding step's draw.
    """
    if weights_NV.ndim != 2 or weights_NV.shape[-1] == 0:
        raise ValueError(f"weights_NV must be (N, V) with V > 0, got {tuple(weights_NV.shape)}")
    cdf_NV = weights_NV.to(torch.float64).cumsum(dim=-1)
    total_N1 = cdf_NV[:, -1:]
    if not (torch.isfinite(total_N1).all() and (total_N1 > 0).all() and (weights_NV >= 0).all()):
        raise ValueError("weights_NV rows must be finite, non-negative and not all zero (a diverged model?)")
    u_N1 = torch.rand(total_N1.shape, dtype=torch.float64, device=weights_NV.device, generator=generator) * total_N1
    # u < total strictly (the product can round up to it), so the first CDF entry above u has positive weight
    u_N1 = torch.minimum(u_N1, torch.nextafter(total_N1, torch.zeros_like(total_N1)))
    return torch.searchsorted(cdf_NV, u_N1, right=True)
