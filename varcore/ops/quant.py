"""The ops of VAR's multi-scale residual quantiser, each beside its pure-PyTorch reference ``<op>_ref``:
``nearest_code``, ``msrq_encode`` (the encode pyramid), ``upsample_sum`` (decode a token pyramid) and ``add_scale_``
(one decode step). ``VectorQuantizer2`` composes them into the official methods (``idxBl_to_var_input``,
``embed_to_fhat``, ...).

They take everything they need explicitly: the codebook ``codebook_VC`` (V codes of C channels), ``phis`` (one
callable per scale: the residual conv phi chosen for that scale, mapping (B, C, H, W) to the same shape; a
:class:`PhiTable` also carries their parameters for the kernels) and the patch schedule. ``VectorQuantizer2``
(official method names) calls them with its own embedding, phi table and ``v_patch_nums``.

Compiled kernels run behind the same signatures when they are built for the tensor's device (``varcore.info()``):
``nearest_code`` (``torch.ops.varcore.nearest_code``: the distance and argmin fused, never holding the N x V
distance matrix, bit-compatible with the reference's arithmetic) serves every nearest-code search, and
``msrq_encode`` runs the whole encode pyramid in one call (area downsampling straight into token rows, nearest code,
the code map gathered and bicubic-upsampled in one kernel, phi, residual update), and ``upsample_sum``
(``torch.ops.varcore.upsample_sum``: gather and bicubic upsampling fused, summed per phi) decodes
a whole pyramid with one 3x3 conv instead of one per scale: phi is affine, phi_k(h) = (1 - r) h + r (W_k * h + b_k),
so the scales sharing phi_k can be summed before it, and the K convs of the partial sums are one conv over their
channel concatenation (bias sum_k n_k b_k for n_k scales in group k). ``add_scale_`` is one step of the sampler
(the official ``get_next_autoregressive_input``) and of the teacher-forcing input (``idxBl_to_var_input``):
gather, bicubic upsampling, phi and the in-place add, then the area downsampling to the next scale. The encode
and the steps give the reference's results bit for bit on the CPU (same float evaluation order, same memory
layouts into phi's conv); ``upsample_sum`` agrees to float rounding (it reorders the sum).

Semantics follow the official FoundationVision/VAR quantiser exactly (``spec/var.md`` 1.4-1.7): residuals are
area-downsampled to each scale, code maps are bicubic-upsampled to the full latent size before phi, and the last
scale is never resized.
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from varcore.ops import extension
from varcore.ops.value_checks import check_range

Phi = Callable[[torch.Tensor], torch.Tensor]
PatchNum = Union[int, Tuple[int, int]]

__all__ = [
    "PhiTable",
    "nearest_code",
    "nearest_code_ref",
    "upsample_sum",
    "upsample_sum_ref",
    "msrq_encode",
    "msrq_encode_ref",
    "add_scale_",
    "add_scale_ref",
    "upsample_sum_is_fused",
    "check_idx_pyramid",
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
    check_range(idx, 0, vocab_size, name)


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


_NEAREST_CODE = extension.register_op("nearest_code")
# The CUDA kernel stages rows of C + 1 floats in 48 KiB of shared memory (csrc/quant/quant.h).
_NEAREST_CODE_CUDA_MAX_C = 306


def _check_nearest_args(z_NC: torch.Tensor, codebook_VC: torch.Tensor) -> None:
    if not isinstance(z_NC, torch.Tensor):
        raise TypeError(f"z_NC must be a torch.Tensor, got {type(z_NC).__name__}")
    _check_codebook(codebook_VC)
    if codebook_VC.shape[0] == 0 or codebook_VC.shape[1] == 0:
        raise ValueError(f"codebook_VC must hold at least one code of at least one channel, got "
                         f"{tuple(codebook_VC.shape)}")
    if z_NC.ndim != 2 or z_NC.shape[1] != codebook_VC.shape[1]:
        raise ValueError(f"z_NC must be (N, {codebook_VC.shape[1]}), got {tuple(z_NC.shape)}")
    if z_NC.device != codebook_VC.device:
        raise ValueError(f"z_NC on {z_NC.device} but codebook_VC on {codebook_VC.device}")


def nearest_code_ref(z_NC: torch.Tensor, codebook_VC: torch.Tensor, using_znorm: bool = False) -> torch.Tensor:
    """Reference of :func:`nearest_code`: the official dense distance matrix, then argmin (argmax)."""
    _check_nearest_args(z_NC, codebook_VC)
    codebook_VC = codebook_VC.detach()
    if using_znorm:
        return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook_VC, dim=1).T, dim=1)
    dist_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook_VC.square(), dim=1)
    dist_NV.addmm_(z_NC, codebook_VC.T, alpha=-2, beta=1)
    return torch.argmin(dist_NV, dim=1)


def _nearest_code_kernel_applies(z_NC: torch.Tensor, codebook_VC: torch.Tensor) -> bool:
    if not extension.use_kernel("nearest_code", z_NC.device):
        return False
    if z_NC.dtype != torch.float32 or codebook_VC.dtype != torch.float32:
        return False  # the kernels are float32 (VAR's quantiser always runs in float32)
    return z_NC.device.type != "cuda" or codebook_VC.shape[1] <= _NEAREST_CODE_CUDA_MAX_C


def nearest_code(z_NC: torch.Tensor, codebook_VC: torch.Tensor, using_znorm: bool = False) -> torch.Tensor:
    """Index of the nearest code for each row of ``z_NC`` (N, C) among ``codebook_VC`` (V, C): a (N,) LongTensor.

    Euclidean distance in the official expanded form ``(||z||^2 + ||e||^2) - 2 z.e`` (the form and its float
    evaluation order decide near-ties), or the largest cosine similarity when ``using_znorm``. Exact ties go to the
    first (smallest) index, as ``torch.argmin`` / ``torch.argmax``. The fused kernel never builds the N x V
    distance matrix; a NaN distance never wins there (``torch.argmin`` would pick the first NaN).
    """
    _check_nearest_args(z_NC, codebook_VC)
    if _nearest_code_kernel_applies(z_NC, codebook_VC):
        return torch.ops.varcore.nearest_code(z_NC.detach(), codebook_VC.detach(), bool(using_znorm))
    return nearest_code_ref(z_NC, codebook_VC, using_znorm)


if extension.has_schema("nearest_code"):  # absent from an older build
    @torch.library.register_fake(_NEAREST_CODE)
    def _(z, codebook, using_znorm=False):
        torch._check(z.dim() == 2 and codebook.dim() == 2, lambda: "nearest_code: z and codebook must be 2-D")
        torch._check(z.shape[1] == codebook.shape[1], lambda: "nearest_code: z and codebook channels differ")
        return z.new_empty((z.shape[0],), dtype=torch.long)


# ---------------------------------------------------------------------------------------------- upsample-sum
_UPSAMPLE_SUM = extension.register_op("upsample_sum")


class PhiTable(tuple):
    """The phi of every scale (callables (B, C, H, W) -> (B, C, H, W), what the references call) together with
    their parameters, given explicitly for the fused kernels: phi_si(h) = (1 - ratio) h + ratio (W_g * h + b_g),
    a 3x3 conv with padding 1, for the group g = ``groups[si]`` (scales sharing one phi share a group), with
    ``weights[g]`` (C, C, 3, 3) and ``biases[g]`` (C,); every phi is the identity when ``weights`` is empty.
    ``VectorQuantizer2.phis_for`` builds one; a plain list of callables always runs the references. Immutable,
    so that the callables and the parameters cannot drift apart."""

    def __new__(cls, phis: Sequence[Phi], groups: Sequence[int], weights: Sequence[torch.Tensor],
                biases: Sequence[torch.Tensor], ratio: float):
        return super().__new__(cls, phis)

    def __init__(self, phis: Sequence[Phi], groups: Sequence[int], weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor], ratio: float):
        self.groups, self.weights, self.biases, self.ratio = list(groups), list(weights), list(biases), float(ratio)
        if len(self.groups) != len(self) or sorted(set(self.groups)) != list(range(max(self.groups, default=-1) + 1)):
            raise ValueError(f"groups must give every scale's group, numbered from 0, got {self.groups}")
        if self.weights and not len(self.weights) == len(self.biases) == self.num_groups:
            raise ValueError(f"weights and biases must hold one tensor per group ({self.num_groups}), got "
                             f"{len(self.weights)} and {len(self.biases)}")

    @property
    def num_groups(self) -> int:
        return max(self.groups) + 1

    def detached(self) -> "PhiTable":
        return PhiTable(self, self.groups, [w.detach() for w in self.weights], [b.detach() for b in self.biases],
                        self.ratio)

    def scale(self, si: int):
        """(weight, bias, ratio) of scale ``si`` for ``add_scale_``; (None, None, 0.0) for the identity."""
        if not self.weights:
            return None, None, 0.0
        g = self.groups[si]
        return self.weights[g], self.biases[g], self.ratio

    def apply(self, sums_BKChw: torch.Tensor) -> torch.Tensor:
        """sum over scales of phi(h) from the per-group sums (B, K*C, H, W) of the upsampled code maps."""
        B, KC, H, W = sums_BKChw.shape
        total_BChw = sums_BKChw.view(B, self.num_groups, KC // self.num_groups, H, W).sum(1)
        if not self.weights:
            return total_BChw
        counts = [self.groups.count(k) for k in range(self.num_groups)]
        weight = torch.cat(self.weights, dim=1)  # sum_k W_k * S_k is one conv over the channel concatenation
        bias = sum(n * b for n, b in zip(counts, self.biases))
        r = self.ratio
        return total_BChw.mul(1 - r) + F.conv2d(sums_BKChw, weight, bias, padding=1).mul_(r)


def _fused_phis(phis: Sequence[Phi], *tensors: torch.Tensor, needs_grad: bool = True) -> Optional[PhiTable]:
    """``phis`` with detached parameters when a fused kernel applies to them: a :class:`PhiTable` with float32
    parameters on the tensors' device and, if the result ``needs_grad``, no gradient required (the fused paths
    have no autograd). Otherwise None (the reference)."""
    if not isinstance(phis, PhiTable):
        return None
    params = phis.weights + phis.biases
    if needs_grad and torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *params)):
        return None
    device = tensors[0].device
    if any(t.dtype != torch.float32 or t.device != device for t in params):
        return None
    return phis.detached()


def check_idx_pyramid(idx_Bl: Sequence[torch.Tensor], vocab_size: int, patch_nums: Tuple[int, ...],
                      name: str = "idx_Bl") -> int:
    """Check a token pyramid (one (B, pn^2) integer tensor per scale of ``patch_nums``, values in [0, vocab_size))
    and return B; a TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(idx_Bl, torch.Tensor) or not hasattr(idx_Bl, "__len__"):
        raise TypeError(f"{name} must be a list of (B, pn^2) tensors, got {type(idx_Bl).__name__}")
    if len(idx_Bl) != len(patch_nums):
        raise ValueError(f"{name} must hold {len(patch_nums)} scales, got {len(idx_Bl)}")
    B = idx_Bl[0].shape[0] if isinstance(idx_Bl[0], torch.Tensor) else None
    for si, (t, pn) in enumerate(zip(idx_Bl, patch_nums)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, pn * pn):
            raise ValueError(f"{name}[{si}] must have shape {(B, pn * pn)}, got {tuple(getattr(t, 'shape', ()))}")
        check_idx(t, vocab_size, f"{name}[{si}]")
    return B


def upsample_sum_ref(idx_Bl: Sequence[torch.Tensor], codebook_VC: torch.Tensor, phis: Sequence[Phi],
                     patch_nums: Sequence[int]) -> torch.Tensor:
    """Reference of :func:`upsample_sum` (the official loop): per scale the embedding, bicubic-upsampled to the
    largest size except at the last scale, passed through its phi and added."""
    _check_codebook(codebook_VC)
    patch_nums = check_patch_nums(patch_nums)
    _check_phis(phis, len(patch_nums))
    B = check_idx_pyramid(idx_Bl, codebook_VC.shape[0], patch_nums)
    C, H = codebook_VC.shape[1], patch_nums[-1]
    f_hat = codebook_VC.new_zeros(B, C, H, H, dtype=torch.float32)
    for si, (t, pn) in enumerate(zip(idx_Bl, patch_nums)):
        # transpose + reshape is a view with the official memory layout (matters for bit-exact bicubic)
        h_BChw = F.embedding(t, codebook_VC).transpose(1, 2).reshape(B, C, pn, pn)
        if si < len(patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        f_hat.add_(phis[si](h_BChw))
    return f_hat


def upsample_sum_is_fused(codebook_VC: torch.Tensor, phis: Sequence[Phi]) -> bool:
    """Whether :func:`upsample_sum` runs its fused kernel on this codebook and these phis (otherwise it runs
    :func:`upsample_sum_ref`): the kernel is built for the device, the codebook is float32 and ``phis`` is a
    :class:`PhiTable` of float32 parameters there, and no gradient is required."""
    return (codebook_VC.dtype == torch.float32 and extension.use_kernel("upsample_sum", codebook_VC.device)
            and _fused_phis(phis, codebook_VC) is not None)


def upsample_sum(idx_Bl: Sequence[torch.Tensor], codebook_VC: torch.Tensor, phis: Sequence[Phi],
                 patch_nums: Sequence[int]) -> torch.Tensor:
    """Decode a token pyramid to the final ``f_hat`` (B, C, H, H), H = ``patch_nums[-1]``: the sum over scales of
    ``phis[si]`` applied to the bicubic-upsampled code map of scale si (``idx_Bl[si]``: (B, pn^2) indices into
    ``codebook_VC``; the last scale is not resized). Equal to :func:`upsample_sum_ref` up to float rounding; fused
    (one gather + bicubic kernel and one conv) where :func:`upsample_sum_is_fused`.
    """
    _check_codebook(codebook_VC)
    patch_nums = check_patch_nums(patch_nums)
    _check_phis(phis, len(patch_nums))
    check_idx_pyramid(idx_Bl, codebook_VC.shape[0], patch_nums)
    if not upsample_sum_is_fused(codebook_VC, phis):
        return upsample_sum_ref(idx_Bl, codebook_VC, phis, patch_nums)
    affine = _fused_phis(phis, codebook_VC)
    sums_BKChw = torch.ops.varcore.upsample_sum(torch.cat(list(idx_Bl), dim=1), codebook_VC, list(patch_nums),
                                                affine.groups)
    return affine.apply(sums_BKChw)


if extension.has_schema("upsample_sum"):  # absent from an older build
    @torch.library.register_fake(_UPSAMPLE_SUM)
    def _(idx, codebook, patch_nums, groups):
        torch._check(len(groups) == len(patch_nums), lambda: "upsample_sum: one group per scale")
        H, K, C = patch_nums[-1], max(groups) + 1, codebook.shape[1]
        return codebook.new_empty((idx.shape[0], K * C, H, H))


# ---------------------------------------------------------------------------------------------- encode
_MSRQ_ENCODE = extension.register_op("msrq_encode")


def _square_schedule(patch_hws: List[Tuple[int, int]]) -> Optional[List[int]]:
    return [h for h, _ in patch_hws] if all(h == w for h, w in patch_hws) else None


if extension.has_schema("msrq_encode"):  # absent from an older build
    @torch.library.register_fake(_MSRQ_ENCODE)
    def _(f, codebook, phi_weights, phi_biases, phi_index, resi_ratio, patch_nums, using_znorm=False,
          partial_fhat=False):
        B, L = f.shape[0], sum(pn * pn for pn in patch_nums)
        f_hats = [torch.empty_like(f) for _ in range(len(patch_nums) if partial_fhat else 1)]
        return f.new_empty((B, L), dtype=torch.long), f_hats


def _check_encode_args(f_BChw, codebook_VC, phis, patch_nums) -> List[Tuple[int, int]]:
    if not isinstance(f_BChw, torch.Tensor) or f_BChw.ndim != 4:
        raise ValueError(f"f_BChw must be a (B, C, H, W) tensor, got {getattr(f_BChw, 'shape', type(f_BChw))}")
    _check_codebook(codebook_VC)
    B, C, H, W = f_BChw.shape
    if C != codebook_VC.shape[1]:
        raise ValueError(f"f_BChw has {C} channels but codebook_VC has {codebook_VC.shape[1]}")
    patch_hws = _to_patch_hws(patch_nums)
    if patch_hws[-1] != (H, W):
        raise ValueError(f"the last entry of patch_nums {patch_hws[-1]} must equal the feature size {(H, W)}")
    _check_phis(phis, len(patch_hws))
    return patch_hws


def msrq_encode(
    f_BChw: torch.Tensor,
    codebook_VC: torch.Tensor,
    phis: Sequence[Phi],
    patch_nums: Sequence[PatchNum],
    to_fhat: bool,
    using_znorm: bool = False,
) -> List[torch.Tensor]:
    """Multi-scale residual quantisation of the encoder features ``f_BChw`` (the encode path; the official
    ``VectorQuantizer2.f_to_idxBl_or_fhat``).

    For each scale (small to large) the remaining residual is area-downsampled to the scale (except at the last
    scale), quantised to its nearest codes, the code map is bicubic-upsampled back (except at the last scale),
    passed through ``phis[si]``, added to the running ``f_hat`` and subtracted from the residual.

    Returns one entry per scale: the (B, ph*pw) code indices, or a clone of the accumulated ``f_hat`` (B, C, H, W)
    when ``to_fhat``. ``patch_nums`` holds ints or (h, w) pairs; its last entry must equal (H, W). One fused call
    (``torch.ops.varcore.msrq_encode``) for a square schedule in float32 when ``phis`` is a :class:`PhiTable`;
    otherwise :func:`msrq_encode_ref`.
    """
    patch_hws = _check_encode_args(f_BChw, codebook_VC, phis, patch_nums)
    H, W = f_BChw.shape[-2:]
    square = _square_schedule(patch_hws)
    if (square is not None and H == W and f_BChw.dtype == torch.float32 and codebook_VC.dtype == torch.float32
            and _nearest_code_kernel_applies(f_BChw, codebook_VC)
            and extension.use_kernel("msrq_encode", f_BChw.device)):
        affine = _fused_phis(phis, codebook_VC, needs_grad=to_fhat)
        if affine is not None:
            idx_BL, f_hats = torch.ops.varcore.msrq_encode(
                f_BChw.detach(), codebook_VC.detach(), affine.weights, affine.biases, affine.groups, affine.ratio,
                square, bool(using_znorm), bool(to_fhat))
            if to_fhat:
                return list(f_hats)
            return [t.contiguous() for t in idx_BL.split([pn * pn for pn in square], dim=1)]
    return msrq_encode_ref(f_BChw, codebook_VC, phis, patch_nums, to_fhat, using_znorm)


def msrq_encode_ref(
    f_BChw: torch.Tensor,
    codebook_VC: torch.Tensor,
    phis: Sequence[Phi],
    patch_nums: Sequence[PatchNum],
    to_fhat: bool,
    using_znorm: bool = False,
) -> List[torch.Tensor]:
    """Reference of :func:`msrq_encode`: the official per-scale loop."""
    patch_hws = _check_encode_args(f_BChw, codebook_VC, phis, patch_nums)
    B, C, H, W = f_BChw.shape
    SN = len(patch_hws)
    f_rest = f_BChw.detach().clone()
    f_hat = torch.zeros_like(f_rest)
    out: List[torch.Tensor] = []
    for si, (ph, pw) in enumerate(patch_hws):
        last = si == SN - 1
        rest_BChw = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode="area")
        idx_N = nearest_code(rest_BChw.permute(0, 2, 3, 1).reshape(-1, C), codebook_VC, using_znorm)
        # permute keeps the (B, h, w, C) memory layout, exactly as the official code feeds bicubic
        h_BChw = F.embedding(idx_N.view(B, ph, pw), codebook_VC).permute(0, 3, 1, 2)
        if not last:
            h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
        h_BChw = phis[si](h_BChw.contiguous())
        f_hat.add_(h_BChw)
        f_rest.sub_(h_BChw)
        out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
    return out


# ---------------------------------------------------------------------------------------------- decode steps
_ADD_SCALE = extension.register_op("add_scale_")


if extension.has_schema("add_scale_"):  # absent from an older build
    @torch.library.register_fake(_ADD_SCALE)
    def _(f_hat, idx, codebook, phi_weight, phi_bias, resi_ratio, next_pn, rows, channels_last):
        B, C = f_hat.shape[:2]
        shape = (B, next_pn * next_pn, C) if rows else (B, C, next_pn, next_pn)
        return f_hat.new_empty(shape)


def _step_phi(phis: Sequence[Phi], si: int, *tensors: torch.Tensor):
    """(weight, bias, ratio) of phis[si] for add_scale_, or None when the fused step does not apply (_fused_phis)."""
    fused = _fused_phis(phis, *tensors)
    return None if fused is None else fused.scale(si)


def _interpolates_channels_last(h_BChw: torch.Tensor) -> bool:
    """Whether F.interpolate (and phi's conv) would work on ``h_BChw`` in channels-last memory: ATen follows the
    input's suggested memory format, and the conv's rounding depends on it."""
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(h_BChw) == torch.channels_last


def _add_scale_applies(f_hat_BChw: torch.Tensor, codebook_VC: torch.Tensor) -> bool:
    return (extension.use_kernel("add_scale_", f_hat_BChw.device) and f_hat_BChw.dtype == torch.float32
            and codebook_VC.dtype == torch.float32 and f_hat_BChw.is_contiguous()
            and f_hat_BChw.shape[-1] == f_hat_BChw.shape[-2] and codebook_VC.device == f_hat_BChw.device)


def _check_step_args(si, patch_nums) -> Tuple[int, ...]:
    patch_nums = check_patch_nums(patch_nums)
    if isinstance(si, bool) or not isinstance(si, int) or not 0 <= si < len(patch_nums):
        raise ValueError(f"si must be an int in [0, {len(patch_nums)}), got {si!r}")
    return patch_nums


def add_scale_(
    si: int,
    f_hat_BChw: torch.Tensor,
    h_BChw: torch.Tensor,
    phis: Sequence[Phi],
    patch_nums: Sequence[int],
    rows: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode step (the official ``get_next_autoregressive_input``): add scale ``si``'s code map ``h_BChw``
    to ``f_hat_BChw`` in place.

    Before the last scale ``h`` is bicubic-upsampled first and then passed through phi (that order matters), and
    the second return value is ``f_hat`` area-downsampled to the next scale: (B, C, pn, pn), or with ``rows`` the
    token rows (B, pn^2, C) that VAR takes as input. At the last scale ``h`` is added at its own size and ``f_hat``
    is returned twice. One fused call (``torch.ops.varcore.add_scale_``) in float32 when ``phis`` is a
    :class:`PhiTable`; otherwise :func:`add_scale_ref`.
    """
    patch_nums = _check_step_args(si, patch_nums)
    SN = len(patch_nums)
    _check_phis(phis, SN)
    HW = patch_nums[-1]
    step = _step_phi(phis, si, f_hat_BChw, h_BChw)
    h_square = (h_BChw.ndim == 4 and h_BChw.shape[-1] == h_BChw.shape[-2] and h_BChw.shape[:2] == f_hat_BChw.shape[:2]
                and (si != SN - 1 or h_BChw.shape[-1] == HW))  # the last scale is added as it is
    if (step is not None and h_square and h_BChw.dtype == torch.float32 and h_BChw.device == f_hat_BChw.device
            and f_hat_BChw.shape[-1] == HW and _add_scale_applies(f_hat_BChw, h_BChw)):
        # the code map becomes a table of B*pn^2 rows indexed by position, so add_scale_'s gather is the identity
        B, C, pn = h_BChw.shape[0], h_BChw.shape[1], h_BChw.shape[-1]
        table_VC = h_BChw.permute(0, 2, 3, 1).reshape(B * pn * pn, C)
        idx_BL = torch.arange(B * pn * pn, device=h_BChw.device).view(B, pn * pn)
        weight, bias, ratio = step
        last = si == SN - 1
        next_BChw = torch.ops.varcore.add_scale_(f_hat_BChw, idx_BL, table_VC, weight, bias, ratio,
                                                 0 if last else patch_nums[si + 1], bool(rows),
                                                 _interpolates_channels_last(h_BChw))
        return f_hat_BChw, f_hat_BChw if last else next_BChw
    return add_scale_ref(si, f_hat_BChw, h_BChw, phis, patch_nums, rows)


def add_scale_ref(
    si: int,
    f_hat_BChw: torch.Tensor,
    h_BChw: torch.Tensor,
    phis: Sequence[Phi],
    patch_nums: Sequence[int],
    rows: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`add_scale_` (the official step)."""
    patch_nums = _check_step_args(si, patch_nums)
    SN = len(patch_nums)
    _check_phis(phis, SN)
    HW = patch_nums[-1]
    if si != SN - 1:
        f_hat_BChw.add_(phis[si](F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")))
        pn_next = patch_nums[si + 1]
        next_BChw = F.interpolate(f_hat_BChw, size=(pn_next, pn_next), mode="area")
        return f_hat_BChw, next_BChw.flatten(2).transpose(1, 2) if rows else next_BChw
    f_hat_BChw.add_(phis[si](h_BChw))
    return f_hat_BChw, f_hat_BChw
