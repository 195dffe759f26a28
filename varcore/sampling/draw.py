"""The draws of every sampler: logit filters (top-k, top-p), multinomial and inverse-CDF draws, Gumbel softmax,
guidance and temperature, and the checks of their arguments.

They mirror the official ``models/helpers.py`` semantics, including in-place filtering and the exact sequence of
random draws, so that the same generator state gives the same tokens.
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from varcore.ops.value_checks import check_range

__all__ = ["top_k_top_p_filter_", "top_k_top_p_filtering", "sample_with_top_k_top_p_", "gumbel_softmax_with_rng",
           "inverse_cdf_sample", "inverse_cdf_uniforms", "inverse_cdf_index", "check_draw", "probs_llamagen",
           "draw_rows", "check_cfg", "check_top_k", "check_top_p", "check_number", "check_batch",
           "per_scale", "temper", "nonfinite_rows", "raise_if_nonfinite", "check_images_finite", "DRAWS",
           "draw_llamagen", "guide_var", "guide_llamagen", "check_bool", "scale_options", "class_labels",
           "label_tensor"]


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


def check_top_p(top_p, name: str = "top_p") -> float:
    """A float in [0, 1]."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(top_p).__name__}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {top_p}")
    return float(top_p)


def check_number(name: str, value, lo: float, hi: float = math.inf) -> float:
    """A real number in [lo, hi] (a TypeError for anything else, a ValueError naming ``name`` outside)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_batch(B, name: str = "B") -> int:
    """A batch size: an int >= 1."""
    if isinstance(B, bool) or not isinstance(B, int):
        raise TypeError(f"{name} must be an int, got {type(B).__name__}")
    if B < 1:
        raise ValueError(f"{name} must be >= 1, got {B}")
    return B


def per_scale(name: str, value, SN: int, kind: type, ok, rule: str) -> list:
    """A scalar broadcast to SN scales, or a sequence of exactly SN values; each checked by ``ok`` (``rule`` says
    what ``ok`` accepts, for the error message). ``kind`` is int or float."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * SN
    if len(values) != SN:
        raise ValueError(f"{name} must be a scalar or hold one value per scale ({SN}), got {len(values)}")
    for v in values:
        valid_type = isinstance(v, int) if kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not valid_type:
            raise TypeError(f"{name} must be {'an int' if kind is int else 'a float'} or a sequence of them, "
                            f"got {type(v).__name__}")
        if not ok(v):
            raise ValueError(f"{name} values must be {rule}, got {v}")
    return [kind(v) for v in values]


CONVENTIONS = ("var", "llamagen")


def top_k_top_p_filter_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, *, convention: str = "var",
                        sort_top_k_only: bool = False) -> torch.Tensor:
    """Set filtered-out logits (any shape, codes last) to -inf in place and return ``logits_BlV``.

    top-k keeps every logit >= the k-th largest (ties at the threshold survive). The two official conventions
    differ in top-p and in the values that disable a filter:

    * ``"var"`` (VAR, CoDe): ``top_k`` in [0, V] (0 or V keep all), ``top_p`` in [0, 1] with 0 disabling it. top-p
      sorts ascending, takes the cumulative softmax of the top-k-filtered logits and removes the positions whose
      cumulative mass is <= 1 - top_p; the largest logit always stays.
    * ``"llamagen"`` (LlamaGen, PAR; HuggingFace-style): ``top_k`` >= 0 (clamped to V), ``top_p`` in [0, 1] with 1
      disabling it. top-p sorts descending and removes the positions after the first whose cumulative mass (the
      position's own included) exceeds ``top_p``: the smallest prefix holding more than ``top_p`` stays.

    ``sort_top_k_only`` (``"var"`` only, with both filters on): top-p sorts just the k candidates that top-k keeps
    rather than the whole vocabulary. The kept set is the same up to rounding (the candidates' softmax is
    normalised over k values instead of V), so it is for reduced-precision sampling, not for parity.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    V = logits_BlV.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    check_top_p(top_p)
    if convention == "llamagen":
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        top_k, top_p = min(top_k, V), (0.0 if top_p >= 1.0 else top_p)
    else:
        check_top_k(top_k, V)
    if sort_top_k_only and convention == "var" and top_p > 0 and 0 < top_k < V:
        top_Blk = logits_BlV.topk(top_k, dim=-1, sorted=True)[0].flip(-1)  # ascending
        remove_Blk = top_Blk.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_Blk[..., -1] = False  # the largest logit always stays
        keep_from = top_Blk.masked_fill(remove_Blk, torch.inf).amin(dim=-1, keepdim=True)
        return logits_BlV.masked_fill_(logits_BlV < keep_from, -torch.inf)
    if 0 < top_k < V:
        kth_largest = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_largest, -torch.inf)
    if top_p <= 0:
        return logits_BlV
    if convention == "var":
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_to_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_to_remove[..., -1:] = False
    else:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=True)
        crossed = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
        # shifted right: the position that crosses the threshold stays, and so does the top one
        sorted_to_remove = torch.zeros_like(crossed)
        sorted_to_remove[..., 1:] = crossed[..., :-1]
    return logits_BlV.masked_fill_(sorted_to_remove.scatter(-1, sorted_idx, sorted_to_remove), -torch.inf)


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """LlamaGen's official filter (``top_p=1`` disables top-p): :func:`top_k_top_p_filter_` with
    ``convention="llamagen"``, in place."""
    return top_k_top_p_filter_(logits, top_k, top_p, convention="llamagen")


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


def inverse_cdf_sample(weights_NV: torch.Tensor, generator: Optional[torch.Generator] = None,
                       nonfinite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One draw per row of ``weights_NV`` (N, V) (non-negative, need not sum to 1): (N, 1) int64 indices.

    Same distribution as ``torch.multinomial(weights_NV, 1)`` but a different use of the generator: one uniform
    float64 per row (:func:`inverse_cdf_uniforms`), inverted through the row's float64 cumulative weights
    (:func:`inverse_cdf_index`). ``multinomial`` draws one exponential per entry (argmax of p / Exp(1)), which on a
    CPU costs far more than the rest of a few-row decoding step's draw.

    A row that is not finite, has a negative weight or is all zero raises a ValueError, or, with ``nonfinite`` (a
    bool scalar tensor), is or-ed into that flag on the device (no host read; its draw is some index in [0, V)).
    """
    if weights_NV.ndim != 2 or weights_NV.shape[-1] == 0:
        raise ValueError(f"weights_NV must be (N, V) with V > 0, got {tuple(weights_NV.shape)}")
    flag = torch.zeros((), dtype=torch.bool, device=weights_NV.device) if nonfinite is None else nonfinite
    blocks = _CDFBlocks(weights_NV, flag)  # before the uniforms: a refused row draws nothing from the generator
    if nonfinite is None and bool(flag):
        raise ValueError("weights_NV rows must be finite, non-negative and not all zero (a diverged model?)")
    return blocks.invert(inverse_cdf_uniforms(weights_NV.shape[0], weights_NV.device, generator))


def inverse_cdf_uniforms(N: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The random numbers of N inverse-CDF draws: (N, 1) float64 uniforms in [0, 1) from ``generator``."""
    return torch.rand((N, 1), dtype=torch.float64, device=device, generator=generator)


def inverse_cdf_index(weights_NV: torch.Tensor, u_N1: torch.Tensor,
                      nonfinite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The inverse-CDF draw of each row of ``weights_NV`` (N, V) (non-negative, need not sum to 1) at the uniform
    ``u_N1`` (N, 1) in [0, 1) (:func:`inverse_cdf_uniforms`): (N, 1) int64, the first index whose cumulative
    weight (in float64) exceeds ``u`` times the row's total, always an index of positive weight. A row that is not
    finite, has a negative weight or is all zero is or-ed into ``nonfinite`` (a bool scalar tensor, on the device;
    its index is some value in [0, V)); None skips that check, for callers that flag such rows before their
    softmax. No host reads, static shapes: it can run inside a compiled step.

    The search runs in two levels, so that no (N, V) float64 tensor is written: the float64 sums of blocks of
    about sqrt(V) entries are inverted first, then the cumulative weights inside the chosen block (the same
    distribution up to float64 rounding)."""
    return _CDFBlocks(weights_NV, nonfinite).invert(u_N1)


class _CDFBlocks:
    """A row's weights in blocks of ``bs`` entries (zeros pad V to a multiple) and the float64 cumulative sums of
    the blocks: the first level of the two-level inverse-CDF search."""

    def __init__(self, weights_NV: torch.Tensor, nonfinite: Optional[torch.Tensor]):
        N, V = weights_NV.shape
        self.V, self.bs = V, 1 << max(0, math.ceil(math.log2(V) / 2))  # the power of two >= sqrt(V)
        nb = -(-V // self.bs)
        padded = F.pad(weights_NV, (0, nb * self.bs - V)) if nb * self.bs != V else weights_NV
        self.w_NKb = padded.reshape(N, nb, self.bs)
        self.cdf_NK = self.w_NKb.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
        if nonfinite is not None:
            total_N1 = self.cdf_NK[:, -1:]
            nonfinite.logical_or_(~(torch.isfinite(total_N1).all() & (total_N1 > 0).all() & (weights_NV >= 0).all()))

    def invert(self, u_N1: torch.Tensor) -> torch.Tensor:
        N, nb, bs = self.w_NKb.shape
        total_N1 = self.cdf_NK[:, -1:]
        x_N1 = torch.minimum(u_N1 * total_N1, _below(total_N1))  # the product can round up to the total
        j_N1 = torch.searchsorted(self.cdf_NK, x_N1, right=True).clamp_(max=nb - 1)
        before_N1 = torch.where(j_N1 > 0, self.cdf_NK.gather(1, (j_N1 - 1).clamp(min=0)), torch.zeros_like(x_N1))
        inner_Nb = self.w_NKb.gather(1, j_N1[:, :, None].expand(N, 1, bs))[:, 0].to(torch.float64).cumsum(dim=-1)
        # x - before is in [0, block's sum); strictly below the block's own cumulative total, so that the first
        # entry above it has positive weight whatever the two summation orders round to
        x_N1 = torch.minimum(x_N1 - before_N1, _below(inner_Nb[:, -1:]))
        k_N1 = torch.searchsorted(inner_Nb, x_N1, right=True).clamp_(max=bs - 1)
        return (j_N1 * bs + k_N1).clamp_(max=self.V - 1)


def _below(t: torch.Tensor) -> torch.Tensor:
    """The float just below each entry of ``t`` (towards 0)."""
    return torch.nextafter(t, torch.zeros_like(t))


DRAWS = ("multinomial", "inverse_cdf")


def check_draw(draw, name: str = "draw") -> str:
    """A draw method: one of :data:`DRAWS`."""
    if draw not in DRAWS:
        raise ValueError(f"{name} must be one of {DRAWS}, got {draw!r}")
    return draw


def probs_llamagen(logits_BnV: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   nonfinite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LlamaGen's sampling distribution: (B, n, V) logits -> (B * n, V) probabilities after temperature, top-k and
    top-p (:func:`top_k_top_p_filtering`) and softmax, the rows of :func:`draw_llamagen`'s draw. ``nonfinite`` (a
    bool scalar tensor) is or-ed with whether any row is non-finite, on the device."""
    B, n, V = logits_BnV.shape
    logits = logits_BnV.reshape(B * n, V)
    if temperature != 1.0:  # x / 1.0 == x: skip a pass over the (B * n, V) logits
        logits = logits / max(temperature, 1e-5)
    elif top_k > 0 or top_p < 1.0:
        logits = logits.clone()  # the filters work in place
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
    if nonfinite is not None:
        nonfinite.logical_or_(nonfinite_rows(logits).any())
    return F.softmax(logits, dim=-1)


def draw_rows(weights_NV: torch.Tensor, B: int, method: str = "multinomial",
              generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
              nonfinite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One draw per row of ``weights_NV`` (B * n, V) (non-negative, need not sum to 1): (B * n,) int64 indices.

    ``method="multinomial"`` (one ``torch.multinomial`` call) or ``"inverse_cdf"`` (:func:`inverse_cdf_sample`).
    ``generator`` may be one generator (or None: the global RNG) for all rows, or a sequence of B generators: the
    rows are then B equal blocks, block b drawn from generator b alone. ``nonfinite``: as in
    :func:`inverse_cdf_sample` (the multinomial draw raises on such rows itself).
    """
    check_draw(method, "method")

    def draw(rows_NV, gen):
        if method == "inverse_cdf":
            return inverse_cdf_sample(rows_NV, generator=gen, nonfinite=nonfinite)
        return torch.multinomial(rows_NV, num_samples=1, generator=gen)

    if generator is None or isinstance(generator, torch.Generator):
        return draw(weights_NV, generator).view(-1)
    if len(generator) != B or weights_NV.shape[0] % B:
        raise ValueError(f"generator must be one generator or B={B} of them for {weights_NV.shape[0]} rows, got "
                         f"{len(generator)}")
    n = weights_NV.shape[0] // B
    return torch.cat([draw(weights_NV[b * n:(b + 1) * n], g) for b, g in enumerate(generator)]).view(-1)


def draw_llamagen(logits_BnV: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  sample_logits: bool = True, method: str = "multinomial",
                  generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                  nonfinite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LlamaGen's draw (the official ``sample``/``sample_multi``): (B, n, V) logits -> (B, n) tokens.

    Temperature, top-k and top-p (:func:`top_k_top_p_filtering`), softmax (:func:`probs_llamagen`), then one draw
    over all B*n rows (:func:`draw_rows`): ``method="multinomial"`` (the official draw and RNG stream) or
    ``"inverse_cdf"`` (:func:`inverse_cdf_sample`, the same distribution from one uniform per row);
    ``sample_logits=False`` takes the most likely token.
    ``generator`` may be a sequence of B generators, one per image: image b's n rows are then drawn from its own
    generator alone, so its tokens do not depend on the other images of the batch.
    ``nonfinite`` (a bool scalar tensor) is or-ed with whether any row is non-finite, on the device: the random
    draws refuse such rows and the greedy one would return token 0, so the caller can say why afterwards.
    """
    check_draw(method, "method")
    B, n, V = logits_BnV.shape
    probs = probs_llamagen(logits_BnV, temperature, top_k, top_p, nonfinite)
    if not sample_logits:
        return torch.topk(probs, k=1, dim=-1)[1].view(B, n)
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != B:
        raise ValueError(f"generator must be one generator or B={B} of them, got {len(generator)}")
    return draw_rows(probs, B, method, generator, nonfinite).view(B, n)


def check_bool(value, name: str) -> bool:
    """A bool (an int is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def scale_options(SN: int, V: int, cfg, top_k, top_p, temperature, more_smooth, temperature_name: str = "temperature"):
    """The checked options of a VAR-family call over SN scales with V codes: ``(cfg, top_ks, top_ps,
    temperatures)``, the last three one value per scale (each given as a scalar or as SN values)."""
    cfg = check_cfg(cfg)
    check_bool(more_smooth, "more_smooth")
    top_ks = per_scale("top_k", top_k, SN, int, lambda v: 0 <= v <= V, f"in [0, V={V}]")
    top_ps = per_scale("top_p", top_p, SN, float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    temps = per_scale(temperature_name, temperature, SN, float, lambda v: v > 0 and math.isfinite(v),
                      "> 0 and finite")
    return cfg, top_ks, top_ps, temps


def label_tensor(labels, num_classes: int, device, name: str = "labels", null_class: bool = False) -> torch.Tensor:
    """A non-empty (B,) long tensor of class labels on ``device`` from a 1-D integer tensor, a list of ints or one
    int, each in [0, ``num_classes``) (or [0, ``num_classes``] with the ``null_class``); a ValueError or TypeError
    naming ``name`` otherwise."""
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = [labels]
    if isinstance(labels, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise TypeError(f"{name} must hold ints, got {labels!r}")
        labels = torch.tensor(labels, dtype=torch.long)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, a list of ints or an int, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool \
            or labels.is_complex():
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    top = num_classes + 1 if null_class else num_classes
    labels = labels.to(device=device, dtype=torch.long)
    check_range(labels, 0, top, name)
    return labels


def class_labels(B: int, label_B, num_classes: int, device, generators) -> torch.Tensor:
    """The (B,) long labels of a class-conditional call, from the official forms of ``label_B``: None draws them
    uniformly (one multinomial over the classes; with one generator per image, one draw from each), an int is one
    class for all (negative: the null class ``num_classes``), a (B,) integer tensor is checked and used."""
    if label_B is None:
        uniform = torch.full((1, num_classes), 1.0 / num_classes, device=device)
        draws = [torch.multinomial(uniform, num_samples=B if len(generators) == 1 else 1, replacement=True,
                                   generator=g).reshape(-1) for g in generators]
        return draws[0] if len(draws) == 1 else torch.cat(draws)
    if isinstance(label_B, bool):
        raise TypeError("label_B must be None, an int or a LongTensor, got bool")
    if isinstance(label_B, int):
        if label_B > num_classes:
            raise ValueError(f"label_B must be < {num_classes + 1} (or negative for the null class), got {label_B}")
        return torch.full((B,), num_classes if label_B < 0 else label_B, device=device)
    if not isinstance(label_B, torch.Tensor):
        raise TypeError(f"label_B must be None, an int or a LongTensor, got {type(label_B).__name__}")
    if tuple(label_B.shape) != (B,):
        raise ValueError(f"label_B must be an integer tensor of shape ({B},), got {label_B.dtype} "
                         f"{tuple(label_B.shape)}")
    return label_tensor(label_B, num_classes, device, "label_B", null_class=True)


def guide_var(cond: torch.Tensor, uncond: torch.Tensor, t: float) -> torch.Tensor:
    """VAR's classifier-free guidance in the official op order: ``(1 + t) cond - t uncond``, a new tensor
    (``uncond`` is scaled in place: pass a tensor that is not needed afterwards)."""
    return cond.mul(1 + t).sub_(uncond.mul_(t))


def guide_llamagen(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """LlamaGen's / PAR's classifier-free guidance in the official op order: ``uncond + (cond - uncond) * scale``."""
    return uncond + (cond - uncond) * scale
