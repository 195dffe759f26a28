"""``VectorQuantizer2``: VAR's multi-scale residual vector quantiser with (partially) shared phi convs.

State-dict keys, constructor arguments and method names match the official FoundationVision/VAR ``quant.py``.
The quantiser ops live in :mod:`varcore.ops.quant` as plain functions (``nearest_code``, ``msrq_encode``,
``upsample_sum``, ``add_scale_``); the official methods here pick the phi for each scale and compose them.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from varcore.ops import quant as quant_ops

__all__ = ["VectorQuantizer2", "Phi", "PhiShared", "PhiPartiallyShared", "PhiNonShared", "phi_ticks",
           "phi_index", "phi_index_table"]


def phi_ticks(K: int) -> np.ndarray:
    """Positions in [0, 1] of K phi convs, in float64 exactly as the official code computes them."""
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    # The official special case: 4 phis are spread over [1/12, 11/12] instead of [1/8, 7/8].
    margin = 1 / 3 / K if K == 4 else 1 / 2 / K
    return np.linspace(margin, 1 - margin, K)


def phi_index(at_from_0_to_1: float, ticks: np.ndarray) -> int:
    """Index of the tick nearest to ``at_from_0_to_1``; on a float tie the first minimum wins.

    Exact ties in real arithmetic (e.g. si=2 and si=7 of 10 scales with K=4) are decided by float64 rounding, so
    the arithmetic must stay as is: numpy subtraction, abs and argmin on the official ticks.
    """
    return int(np.argmin(np.abs(ticks - at_from_0_to_1)))


def phi_index_table(K: int, SN: int) -> List[int]:
    """The phi used at each of SN scales when K phis are shared (scale si sits at si / (SN - 1))."""
    if not isinstance(SN, int) or SN < 2:
        raise ValueError(f"SN must be an int >= 2, got {SN!r}")
    ticks = phi_ticks(K)
    return [phi_index(si / (SN - 1), ticks) for si in range(SN)]


class Phi(nn.Conv2d):
    """Residual 3x3 conv: ``phi(h) = (1 - r) * h + r * conv(h)`` with ``r = |quant_resi|``."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _make_phi(Cvae: int, quant_resi: float) -> nn.Module:
    return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


def _check_at(at_from_0_to_1: float) -> float:
    if not 0.0 <= at_from_0_to_1 <= 1.0:
        raise ValueError(f"phi position must be in [0, 1], got {at_from_0_to_1}")
    return at_from_0_to_1


class PhiShared(nn.Module):
    """One phi for every scale (``share_quant_resi=1``); key ``qresi``."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        _check_at(at_from_0_to_1)
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """K phis shared by all scales, each scale using the nearest tick (``share_quant_resi=K>1``); keys
    ``qresi_ls.{k}``."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[phi_index(_check_at(at_from_0_to_1), self.ticks)]

    def extra_repr(self) -> str:
        return f"ticks={self.ticks}"


class PhiNonShared(nn.ModuleList):
    """One phi per scale (``share_quant_resi=0``); keys ``{k}``. Indexed by position in [0, 1] like the others."""

    def __init__(self, qresi: Sequence[nn.Module]):
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(phi_index(_check_at(at_from_0_to_1), self.ticks))

    def extra_repr(self) -> str:
        return f"ticks={self.ticks}"


class VectorQuantizer2(nn.Module):
    """Multi-scale residual VQ of VAR (official name and state-dict keys).

    Args (as official): ``vocab_size`` V, ``Cvae`` code channels, ``using_znorm`` (cosine instead of Euclidean
    nearest code), ``beta`` commitment weight, ``default_qresi_counts`` (number of phis when not shared; 0 means one
    per scale), ``v_patch_nums`` the square patch schedule, ``quant_resi`` the phi mixing ratio r (0 gives
    identity phis), ``share_quant_resi`` 0 (one phi per scale), 1 (one phi) or K>1 (K partially shared phis).

    Keys: ``embedding.weight`` (V, Cvae), ``ema_vocab_hit_SV`` (SN, V) and ``quant_resi.*``.

    ``prog_si`` (official attribute, -1 by default) is set by progressive training: with ``prog_si = p >= 0``
    :meth:`f_to_idxBl_or_fhat` (hence ``VQVAE.img_to_idxBl``) returns the first ``p + 1`` scales only and
    :meth:`idxBl_to_var_input` the inputs of scales ``1..p`` (None when ``p == 0``), as the official code does.
    """

    def __init__(
        self, vocab_size: int, Cvae: int, using_znorm: bool, beta: float = 0.25,
        default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = None, quant_resi: float = 0.5,
        share_quant_resi: int = 4,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("Cvae", Cvae)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if v_patch_nums is None:
            raise ValueError("v_patch_nums is required")
        v_patch_nums = quant_ops.check_patch_nums(v_patch_nums)
        if len(v_patch_nums) < 2:
            raise ValueError(f"v_patch_nums needs at least 2 scales, got {v_patch_nums}")
        if not isinstance(share_quant_resi, int) or share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be an int >= 0, got {share_quant_resi!r}")
        if not isinstance(default_qresi_counts, int) or default_qresi_counts < 0:
            raise ValueError(f"default_qresi_counts must be an int >= 0, got {default_qresi_counts!r}")

        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.using_znorm = using_znorm
        self.v_patch_nums: Tuple[int, ...] = v_patch_nums
        self.quant_resi_ratio = quant_resi
        if share_quant_resi == 0:
            count = default_qresi_counts or len(v_patch_nums)
            self.quant_resi = PhiNonShared([_make_phi(Cvae, quant_resi) for _ in range(count)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(Cvae, quant_resi))
        else:
            self.quant_resi = PhiPartiallyShared(
                nn.ModuleList([_make_phi(Cvae, quant_resi) for _ in range(share_quant_resi)]))

        # Codebook-usage statistics (only updated in VAE training); persistent, so it is in every checkpoint.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(v_patch_nums), vocab_size))
        self.record_hit = 0
        self.prog_si = -1  # progressive training: scales 0..prog_si only (-1: all)
        self.beta = beta
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def extra_repr(self) -> str:
        return (f"{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}  |  S={len(self.v_patch_nums)}, "
                f"quant_resi={self.quant_resi_ratio}")

    def phis_for(self, SN: int) -> quant_ops.PhiTable:
        """The phi module used at each of SN scales (scale si sits at si / (SN - 1) in the phi table), with their
        parameters for the fused kernels (:class:`varcore.ops.quant.PhiTable`)."""
        if not isinstance(SN, int) or SN < 2:
            raise ValueError(f"SN must be an int >= 2, got {SN!r}")
        phis = [self.quant_resi[si / (SN - 1)] for si in range(SN)]
        distinct: List[nn.Module] = []
        groups = []
        for phi in phis:
            if not any(phi is d for d in distinct):
                distinct.append(phi)
            groups.append(next(k for k, d in enumerate(distinct) if d is phi))
        convs = [d for d in distinct if isinstance(d, Phi)]  # all or none: _make_phi shares one quant_resi
        return quant_ops.PhiTable(phis, groups, [d.weight for d in convs], [d.bias for d in convs],
                                  convs[0].resi_ratio if convs else 0.0)

    # ---------------------------------------------------------------- VQVAE training
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False
                ) -> Tuple[torch.Tensor, Optional[List[float]], torch.Tensor]:
        """VAE-training forward: quantise all scales and return (f_hat with straight-through gradient, per-scale
        codebook usage in % or None, VQ loss). The loss is ``beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2``
        averaged over scales; it always runs in float32 with autocast off.

        Unlike the official code, ``ema_vocab_hit_SV`` is updated in training mode also without torch.distributed
        (the hit counts are all-reduced when it is initialised).
        """
        if f_BChw.ndim != 4 or f_BChw.shape[1] != self.Cvae:
            raise ValueError(f"f_BChw must be (B, {self.Cvae}, H, W), got {tuple(f_BChw.shape)}")
        f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        SN = len(self.v_patch_nums)
        if self.v_patch_nums[-1] != H or H != W:
            raise ValueError(f"f_BChw must be {self.v_patch_nums[-1]}x{self.v_patch_nums[-1]}, got {H}x{W}")
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        mean_vq_loss = f_BChw.new_zeros(())
        with torch.autocast(f_BChw.device.type, enabled=False):
            for si, (pn, phi) in enumerate(zip(self.v_patch_nums, self.phis_for(SN))):
                last = si == SN - 1
                rest = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
                idx_N = quant_ops.nearest_code(rest.permute(0, 2, 3, 1).reshape(-1, C),
                                                     self.embedding.weight, self.using_znorm)
                if self.training:
                    self._record_hits(si, idx_N.bincount(minlength=self.vocab_size).float())
                h_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
                if not last:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
                h_BChw = phi(h_BChw.contiguous())
                f_hat = f_hat + h_BChw
                f_rest -= h_BChw.detach()
                mean_vq_loss = mean_vq_loss + F.mse_loss(f_hat.detach(), f_BChw).mul(self.beta) \
                    + F.mse_loss(f_hat, f_no_grad)
            mean_vq_loss = mean_vq_loss / SN
            f_hat = (f_hat.detach() - f_no_grad) + f_BChw  # straight-through estimator

        usages = None
        if ret_usages:
            world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
            margin = world * (f_BChw.numel() / C) / self.vocab_size * 0.08
            usages = [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(SN)]
        return f_hat, usages, mean_vq_loss

    @torch.no_grad()
    def _record_hits(self, si: int, hit_V: torch.Tensor) -> None:
        if tdist.is_available() and tdist.is_initialized():
            tdist.all_reduce(hit_V)
        # EMA with a fast start: copy, then momentum 0.9 for ~100 updates, then 0.99.
        if self.record_hit == 0:
            self.ema_vocab_hit_SV[si].copy_(hit_V)
        elif self.record_hit < 100:
            self.ema_vocab_hit_SV[si].mul_(0.9).add_(hit_V.mul(0.1))
        else:
            self.ema_vocab_hit_SV[si].mul_(0.99).add_(hit_V.mul(0.01))
        self.record_hit += 1

    # ---------------------------------------------------------------- encode / decode (official API)
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None
                           ) -> List[torch.Tensor]:
        """Quantise encoder features: per scale the (B, ph*pw) indices, or the accumulated f_hat when ``to_fhat``.

        ``v_patch_nums`` (ints or (h, w) pairs) overrides the quantiser's own schedule; its last entry must match
        the feature size. See :func:`varcore.ops.quant.msrq_encode`. With ``prog_si >= 0`` only the first
        ``prog_si + 1`` entries are returned (later scales do not change earlier ones, so they are the same).
        """
        patch_nums = tuple(v_patch_nums or self.v_patch_nums)
        out = quant_ops.msrq_encode(f_BChw, self.embedding.weight, self.phis_for(len(patch_nums)),
                                           patch_nums, to_fhat=to_fhat, using_znorm=self.using_znorm)
        prog_si = self._checked_prog_si()
        return out if prog_si < 0 else out[:prog_si + 1]

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """VAR's teacher-forcing input (B, L - pn0^2, Cvae) in float32 from ground-truth indices; with
        ``prog_si = p >= 0`` the inputs of scales 1..p, (B, sum of pn^2 over scales 1..p, Cvae), from
        ``gt_ms_idx_Bl[:p]`` (None when ``p == 0``, as official).

        Scale by scale, as the sampler decodes: ``add_scale_`` adds the code map of scale si to ``f_hat`` at full
        resolution and area-downsamples the sum to scale si + 1, whose tokens it becomes.
        """
        patch_nums = self.v_patch_nums
        SN = len(patch_nums)
        prog_si = self._checked_prog_si()
        num_steps = SN - 1 if prog_si < 0 else prog_si
        if isinstance(gt_ms_idx_Bl, torch.Tensor) or not hasattr(gt_ms_idx_Bl, "__len__"):
            raise TypeError(f"gt_ms_idx_Bl must be a list of (B, pn^2) tensors, got {type(gt_ms_idx_Bl).__name__}")
        if len(gt_ms_idx_Bl) < num_steps:
            raise ValueError(f"gt_ms_idx_Bl must hold at least {num_steps} scales, got {len(gt_ms_idx_Bl)}")
        if num_steps == 0:
            return None
        B = quant_ops.check_idx_pyramid(gt_ms_idx_Bl[:num_steps], self.vocab_size, patch_nums[:num_steps],
                                        "gt_ms_idx_Bl")
        C, H = self.Cvae, patch_nums[-1]
        phis = self.phis_for(SN)
        f_hat = torch.zeros(B, C, H, H, dtype=torch.float32, device=self.embedding.weight.device)
        next_scales = []
        for si in range(num_steps):
            pn = patch_nums[si]
            # transpose + reshape is a view with the official memory layout (matters for bit-exact bicubic)
            h_BChw = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat, next_BlC = quant_ops.add_scale_(si, f_hat, h_BChw, phis, patch_nums, rows=True)
            next_scales.append(next_BlC)
        return torch.cat(next_scales, dim=1)

    def _checked_prog_si(self) -> int:
        prog_si, SN = self.prog_si, len(self.v_patch_nums)
        if isinstance(prog_si, bool) or not isinstance(prog_si, int) or not -1 <= prog_si <= SN - 1:
            raise ValueError(f"prog_si must be an int in [-1, {SN - 1}], got {prog_si!r}")
        return prog_si

    def idxBl_to_fhat(self, ms_idx_Bl: List[torch.Tensor]) -> torch.Tensor:
        """The final f_hat (B, Cvae, H, H) of a token pyramid (one (B, pn^2) tensor per scale): the last partial sum
        of :meth:`embed_to_fhat` from indices, fused when the kernels are built (see
        :func:`varcore.ops.quant.upsample_sum`)."""
        SN = len(self.v_patch_nums)
        return quant_ops.upsample_sum(ms_idx_Bl, self.embedding.weight, self.phis_for(SN), self.v_patch_nums)

    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
                      ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Sum per-scale code embeddings ``ms_h_BChw`` (one (B, Cvae, pn, pn) tensor per scale) into ``f_hat``:
        all partial sums, one per scale, or only the last with ``last_one``.

        Default (``all_to_max_scale``): every scale but the last is bicubic-upsampled to the largest size, passed
        through its phi and added (``add_scale_`` per scale; the final sum alone is one ``upsample_sum`` call over
        the code maps). Otherwise (experimental, as official; not what the model was trained with) ``f_hat`` starts
        at the first scale, is bicubic-resized to each scale and phi(h) is added at native resolution.
        """
        patch_nums = self.v_patch_nums
        SN = len(patch_nums)
        if isinstance(ms_h_BChw, torch.Tensor) or not hasattr(ms_h_BChw, "__len__"):
            raise TypeError(f"ms_h_BChw must be a list of (B, Cvae, pn, pn) tensors, got {type(ms_h_BChw).__name__}")
        if len(ms_h_BChw) != SN:
            raise ValueError(f"ms_h_BChw must hold {SN} scales, got {len(ms_h_BChw)}")
        h0 = ms_h_BChw[0]
        for si, (h, pn) in enumerate(zip(ms_h_BChw, patch_nums)):
            if not isinstance(h, torch.Tensor) or h.ndim != 4 or tuple(h.shape[1:]) != (self.Cvae, pn, pn) \
                    or h.shape[0] != h0.shape[0]:
                raise ValueError(f"ms_h_BChw[{si}] must have shape (B, {self.Cvae}, {pn}, {pn}), got "
                                 f"{tuple(getattr(h, 'shape', ()))}")
        phis = self.phis_for(SN)
        B, C = h0.shape[:2]
        if not all_to_max_scale:
            f_hat = h0.new_zeros(B, C, patch_nums[0], patch_nums[0], dtype=torch.float32)
            partial = []
            for si, pn in enumerate(patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                f_hat.add_(phis[si](ms_h_BChw[si]))
                partial.append(f_hat)
            return f_hat if last_one else partial
        if last_one and all(h.dtype == torch.float32 and h.device == h0.device for h in ms_h_BChw):
            # the code maps as the rows of a table indexed by position: upsample_sum's gather is the identity
            table_VC = torch.cat([h.flatten(2).transpose(1, 2) for h in ms_h_BChw], dim=1).reshape(-1, C)
            if quant_ops.upsample_sum_is_fused(table_VC, phis):
                idx_BL = torch.arange(table_VC.shape[0], device=h0.device).view(B, -1)
                idx_Bl = list(idx_BL.split([pn * pn for pn in patch_nums], dim=1))
                return quant_ops.upsample_sum(idx_Bl, table_VC, phis, patch_nums)
        f_hat = h0.new_zeros(B, C, patch_nums[-1], patch_nums[-1], dtype=torch.float32)
        partial = []
        for si, h_BChw in enumerate(ms_h_BChw):
            f_hat, _ = quant_ops.add_scale_(si, f_hat, h_BChw, phis, patch_nums)
            if not last_one:
                partial.append(f_hat.clone())
        return f_hat if last_one else partial

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inference step: add scale ``si``'s codes to ``f_hat`` in place and return (f_hat, next-scale input)."""
        if SN != len(self.v_patch_nums):
            raise ValueError(f"SN must equal the number of scales {len(self.v_patch_nums)}, got {SN}")
        return quant_ops.add_scale_(si, f_hat, h_BChw, self.phis_for(SN), self.v_patch_nums)
