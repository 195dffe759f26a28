"""Reference (pure PyTorch) ops of VAR's multi-scale residual quantiser.

These functions take everything they need explicitly: the codebook ``codebook_VC`` (V codes of C channels),
``phis`` (one callable per scale: the residual conv phi chosen for that scale, mapping (B, C, H, W) to the same
shape) and the patch schedule. ``VectorQuantizer2`` calls them with its own embedding, phi table and
``v_patch_nums``; fused kernels can later replace them behind the same signatures.

Semantics follow the official FoundationVision/VAR quantiser exactly (``spec/var.md`` 1.4-1.7): residuals are
area-downsampled to each scale, code maps are bicubic-upsampled to the full latent size before phi, and the last
scale is never resized.
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Phi = Callable[[torch.Tensor], torch.Tensor]
PatchNum = Union[int, Tuple[int, int]]

__all__ = [
    "nearest_code_idx_N",
    "f_to_idxBl_or_fhat",
    "idxBl_to_var_input",
    "embed_to_fhat",
    "get_next_autoregressive_input",
]


def _check_codebook(codebook_VC: torch.Tensor) -> None:
    if not isinstance(codebook_VC, torch.Tensor):
        raise TypeError(f"codebook_VC must be a torch.Tensor, got {type(codebook_VC).__name__}")
    if codebook_VC.ndim != 2 or not codebook_VC.is_floating_point():
        raise ValueError(f"codebook_VC must be a floating (V, C) tensor, got shape {tuple(codebook_VC.shape)} "
                         f"dtype {codebook_VC.dtype}")


def check_patch_nums(patch_nums: Sequence[int]) -> Tuple[int, ...]:
    """Validate a square patch schedule (positive ints) and return it as a tuple."""
    if isinstance(patch_nums, (str, bytes)) or not hasattr(patch_nums, "__iter__"):
        raise TypeError(f"patch_nums must be a sequence of ints, got {type(patch_nums).__name__}")
    patch_nums = tuple(patch_nums)
    if len(patch_nums) < 1 or not all(isinstance(pn, int) and not isinstance(pn, bool) and pn > 0
                                      for pn in patch_nums):
        raise ValueError(f"patch_nums must be a non-empty sequence of positive ints, got {patch_nums}")
    return patch_nums


def check_idx(idx: torch.Tensor, vocab_size: int, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``idx`` is an integer tensor with values in [0, vocab_size)."""
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.numel() and not idx.is_meta and (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"{name} values must be in [0, {vocab_size}), got [{idx.min().item()}, {idx.max().item()}]")


def _to_patch_hws(patch_nums: Sequence[PatchNum]) -> List[Tuple[int, int]]:
    hws = []
    for pn in patch_nums:
        if isinstance(pn, int) and not isinstance(pn, bool):
            hws.append((pn, pn))
        elif isinstance(pn, (tuple, list)) and len(pn) == 2 and all(isinstance(p, int) for p in pn):
            hws.append((pn[0], pn[1]))
        else:
            raise ValueError(f"patch_nums entries must be ints or (h, w) pairs of ints, got {pn!r}")
        if min(hws[-1]) <= 0:
            raise ValueError(f"patch_nums entries must be positive, got {pn!r}")
    if not hws:
        raise ValueError("patch_nums must not be empty")
    return hws


def _check_phis(phis: Sequence[Phi], num_scales: int) -> None:
    if len(phis) != num_scales:
        raise ValueError(f"phis must hold one callable per scale ({num_scales}), got {len(phis)}")
    if not all(callable(phi) for phi in phis):
        raise TypeError("phis must be callables mapping (B, C, H, W) -> (B, C, H, W)")


def nearest_code_idx_N(z_NC: torch.Tensor, codebook_VC: torch.Tensor, using_znorm: bool = False) -> torch.Tensor:
    """Index of the nearest code for each row of ``z_NC``: a (N,) LongTensor.

    Euclidean distance in the official expanded form ``||z||^2 + ||e||^2 - 2 z.e`` (computed with ``addmm``; the
    form matters for which code wins a near-tie), or the largest cosine similarity when ``using_znorm``.
    """
    _check_codebook(codebook_VC)
    if z_NC.ndim != 2 or z_NC.shape[1] != codebook_VC.shape[1]:
        raise ValueError(f"z_NC must be (N, {codebook_VC.shape[1]}), got {tuple(z_NC.shape)}")
    codebook_VC = codebook_VC.detach()
    if using_znorm:
        return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook_VC, dim=1).T, dim=1)
    dist_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook_VC.square(), dim=1)
    dist_NV.addmm_(z_NC, codebook_VC.T, alpha=-2, beta=1)
    return torch.argmin(dist_NV, dim=1)


def f_to_idxBl_or_fhat(
    f_BChw: torch.Tensor,
    codebook_VC: torch.Tensor,
    phis: Sequence[Phi],
    patch_nums: Sequence[PatchNum],
    to_fhat: bool,
    using_znorm: bool = False,
) -> List[torch.Tensor]:
    """Multi-scale residual quantisation of the encoder features ``f_BChw`` (the encode path).

    For each scale (small to large) the remaining residual is area-downsampled to the scale (except at the last
    scale), quantised to its nearest codes, the code map is bicubic-upsampled back (except at the last scale),
    passed through ``phis[si]``, added to the running ``f_hat`` and subtracted from the residual.

    Returns one entry per scale: the (B, ph*pw) code indices, or a clone of the accumulated ``f_hat`` (B, C, H, W)
    when ``to_fhat``. ``patch_nums`` holds ints or (h, w) pairs; its last entry must equal (H, W).
    """
    if not isinstance(f_BChw, torch.Tensor) or f_BChw.ndim != 4:
        raise ValueError(f"f_BChw must be a (B, C, H, W) tensor, got {getattr(f_BChw, 'shape', type(f_BChw))}")
    _check_codebook(codebook_VC)
    B, C, H, W = f_BChw.shape
    if C != codebook_VC.shape[1]:
        raise ValueError(f"f_BChw has {C} channels but codebook_VC has {codebook_VC.shape[1]}")
    patch_hws = _to_patch_hws(patch_nums)
    if patch_hws[-1] != (H, W):
        raise ValueError(f"the last entry of patch_nums {patch_hws[-1]} must equal the feature size {(H, W)}")
    SN = len(patch_hws)
    _check_phis(phis, SN)

    f_rest = f_BChw.detach().clone()
    f_hat = torch.zeros_like(f_rest)
    out: List[torch.Tensor] = []
    for si, (ph, pw) in enumerate(patch_hws):
        last = si == SN - 1
        rest_BChw = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode="area")
        idx_N = nearest_code_idx_N(rest_BChw.permute(0, 2, 3, 1).reshape(-1, C), codebook_VC, using_znorm)
        # permute keeps the (B, h, w, C) memory layout, exactly as the official code feeds bicubic
        h_BChw = F.embedding(idx_N.view(B, ph, pw), codebook_VC).permute(0, 3, 1, 2)
        if not last:
            h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
        h_BChw = phis[si](h_BChw.contiguous())
        f_hat.add_(h_BChw)
        f_rest.sub_(h_BChw)
        out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
    return out


def idxBl_to_var_input(
    idx_Bl: Sequence[torch.Tensor],
    codebook_VC: torch.Tensor,
    phis: Sequence[Phi],
    patch_nums: Sequence[int],
) -> Optional[torch.Tensor]:
    """Teacher-forcing input of VAR from ground-truth token maps ``idx_Bl`` (one (B, pn^2) tensor per scale).

    Accumulates ``f_hat`` over scales 0..SN-2 at full resolution and, after each, area-downsamples it to the next
    scale. Returns the concatenation (B, L - pn0^2, C) in float32, or None for a single-scale schedule.
    """
    _check_codebook(codebook_VC)
    patch_nums = check_patch_nums(patch_nums)
    SN = len(patch_nums)
    _check_phis(phis, SN)
    if len(idx_Bl) < SN - 1:
        raise ValueError(f"idx_Bl must hold at least {SN - 1} scales, got {len(idx_Bl)}")
    B = idx_Bl[0].shape[0]
    C = codebook_VC.shape[1]
    H = patch_nums[-1]
    for si in range(SN - 1):
        if tuple(idx_Bl[si].shape) != (B, patch_nums[si] ** 2):
            raise ValueError(f"idx_Bl[{si}] must have shape {(B, patch_nums[si] ** 2)}, got {tuple(idx_Bl[si].shape)}")
        check_idx(idx_Bl[si], codebook_VC.shape[0], f"idx_Bl[{si}]")

    f_hat = torch.zeros(B, C, H, H, dtype=torch.float32, device=codebook_VC.device)
    next_scales = []
    for si in range(SN - 1):
        pn = patch_nums[si]
        # transpose + reshape is a view with the official memory layout (matters for bit-exact bicubic)
        h_BChw = F.embedding(idx_Bl[si], codebook_VC).transpose(1, 2).reshape(B, C, pn, pn)
        f_hat.add_(phis[si](F.interpolate(h_BChw, size=(H, H), mode="bicubic")))
        pn_next = patch_nums[si + 1]
        next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2))
    return torch.cat(next_scales, dim=1) if next_scales else None


def embed_to_fhat(
    ms_h_BChw: Sequence[torch.Tensor],
    phis: Sequence[Phi],
    patch_nums: Sequence[int],
    all_to_max_scale: bool = True,
    last_one: bool = False,
) -> Union[List[torch.Tensor], torch.Tensor]:
    """Accumulate per-scale code embeddings ``ms_h_BChw`` (one (B, C, pn, pn) tensor per scale) into ``f_hat``.

    Default (``all_to_max_scale``): every scale but the last is bicubic-upsampled to the largest size, passed through
    its phi and added. Otherwise (experimental, as official; not what the model was trained with) ``f_hat`` starts at
    the first scale, is bicubic-resized to each scale and phi(h) is added at native resolution.
    Returns the list of partial sums (one per scale), or only the final ``f_hat`` when ``last_one``.
    """
    patch_nums = check_patch_nums(patch_nums)
    SN = len(patch_nums)
    _check_phis(phis, SN)
    if len(ms_h_BChw) != SN:
        raise ValueError(f"ms_h_BChw must hold {SN} scales, got {len(ms_h_BChw)}")
    B, C = ms_h_BChw[0].shape[:2]
    out: List[torch.Tensor] = []
    if all_to_max_scale:
        H = patch_nums[-1]
        f_hat = ms_h_BChw[0].new_zeros(B, C, H, H, dtype=torch.float32)
        for si in range(SN):
            h_BChw = ms_h_BChw[si]
            if si < SN - 1:
                h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
            f_hat.add_(phis[si](h_BChw))
            if not last_one:
                out.append(f_hat.clone())
    else:
        pn0 = patch_nums[0]
        f_hat = ms_h_BChw[0].new_zeros(B, C, pn0, pn0, dtype=torch.float32)
        for si, pn in enumerate(patch_nums):
            f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
            f_hat.add_(phis[si](ms_h_BChw[si]))
            if not last_one:
                out.append(f_hat)
    return f_hat if last_one else out


def get_next_autoregressive_input(
    si: int,
    f_hat_BChw: torch.Tensor,
    h_BChw: torch.Tensor,
    phis: Sequence[Phi],
    patch_nums: Sequence[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One inference step: add scale ``si``'s code map ``h_BChw`` to ``f_hat_BChw`` (in place).

    Before the last scale ``h`` is bicubic-upsampled first and then passed through phi (that order matters), and
    the second return value is ``f_hat`` area-downsampled to the next scale. At the last scale ``h`` is added at its
    own size and ``f_hat`` is returned twice.
    """
    patch_nums = check_patch_nums(patch_nums)
    SN = len(patch_nums)
    _check_phis(phis, SN)
    if not 0 <= si < SN:
        raise ValueError(f"si must be in [0, {SN}), got {si}")
    HW = patch_nums[-1]
    if si != SN - 1:
        f_hat_BChw.add_(phis[si](F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")))
        pn_next = patch_nums[si + 1]
        return f_hat_BChw, F.interpolate(f_hat_BChw, size=(pn_next, pn_next), mode="area")
    f_hat_BChw.add_(phis[si](h_BChw))
    return f_hat_BChw, f_hat_BChw
