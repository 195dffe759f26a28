"""PAR token order: raster grids <-> PAR order (spec ``code_par_llamagen.md`` B.2).

A G x G token grid is split into M x M regions of side R = G / M. Raster position (r, c) with r = a*R + b and
c = e*R + d goes to PAR index ((b*R + d)*M + a)*M + e: group g = b*R + d (the same offset in every region) is
the outer key and the region k = a*M + e the inner one, so a parallel decoding step fills one group of M*M
tokens. Payloads may be any dtype, with an optional trailing channel dimension.

Each op has a pure-PyTorch reference (``*_ref``) and uses the compiled kernel when one is built for the
tensor's device (``varcore.info()`` says which).
"""
from __future__ import annotations

import torch

from varcore.ops import extension

__all__ = [
    "par_permutation", "par_gather", "par_scatter", "par_group_scatter_",
    "par_gather_ref", "par_scatter_ref", "par_group_scatter_ref_",
]

_GATHER = extension.register_op("par_gather")
_SCATTER = extension.register_op("par_scatter")
_GROUP_SCATTER = extension.register_op("par_group_scatter_")


# ---------------------------------------------------------------------------------------------- validation
def _check_tensor(x, name: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_M(M, G: int, op: str) -> int:
    if isinstance(M, bool) or not isinstance(M, int):
        raise TypeError(f"{op}: M (regions per side) must be an int, got {type(M).__name__}")
    if M < 1:
        raise ValueError(f"{op}: M (regions per side) must be >= 1, got {M}")
    if G < 1 or G % M:
        raise ValueError(f"{op}: grid side G={G} must be a positive multiple of M={M}")
    return G // M


def _check_grid(x, op: str, name: str) -> int:
    _check_tensor(x, name)
    if x.dim() not in (3, 4):
        raise ValueError(f"{op}: {name} must be (B, G, G) or (B, G, G, C), got shape {tuple(x.shape)}")
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"{op}: {name} must hold a square G x G grid, got shape {tuple(x.shape)}")
    return x.shape[1]


def _side_of(L: int, op: str) -> int:
    G = int(round(L ** 0.5))
    if L < 1 or G * G != L:
        raise ValueError(f"{op}: sequence length L={L} must be a square G*G")
    return G


# ---------------------------------------------------------------------------------------------- references
def par_permutation(G: int, M: int, device=None) -> torch.Tensor:
    """Raster index (r*G + c) of each PAR index: ``x.flatten(1, 2)[:, perm]`` is ``par_gather(x, M)``."""
    R = _check_M(M, G, "par_permutation")
    n = torch.arange(G * G, device=device)
    g, k = n // (M * M), n % (M * M)
    b, d, a, e = g // R, g % R, k // M, k % M
    return (a * R + b) * G + e * R + d


def par_gather_ref(x: torch.Tensor, M: int) -> torch.Tensor:
    """Reference: raster (B, G, G[, C]) -> PAR order (B, G*G[, C])."""
    G = _check_grid(x, "par_gather", "x")
    R = _check_M(M, G, "par_gather")
    B, C = x.shape[0], x.shape[3:]
    # [B, a, b, e, d, C] -> [B, b, d, a, e, C]
    return x.reshape(B, M, R, M, R, *C).permute(0, 2, 4, 1, 3, *range(5, 5 + len(C))).reshape(B, G * G, *C)


def par_scatter_ref(x: torch.Tensor, M: int) -> torch.Tensor:
    """Reference: PAR order (B, G*G[, C]) -> raster (B, G, G[, C])."""
    _check_tensor(x, "x")
    if x.dim() not in (2, 3):
        raise ValueError(f"par_scatter: x must be (B, L) or (B, L, C), got shape {tuple(x.shape)}")
    G = _side_of(x.shape[1], "par_scatter")
    R = _check_M(M, G, "par_scatter")
    B, C = x.shape[0], x.shape[2:]
    # [B, b, d, a, e, C] -> [B, a, b, e, d, C]
    return x.reshape(B, R, R, M, M, *C).permute(0, 3, 1, 4, 2, *range(5, 5 + len(C))).reshape(B, G, G, *C)


def _check_group_scatter(canvas, tokens, group, M):
    op = "par_group_scatter_"
    G = _check_grid(canvas, op, "canvas")
    R = _check_M(M, G, op)
    _check_tensor(tokens, "tokens")
    if isinstance(group, bool) or not isinstance(group, int):
        raise TypeError(f"{op}: group must be an int, got {type(group).__name__}")
    if not 0 <= group < R * R:
        raise ValueError(f"{op}: group must be in [0, {R * R}), got {group}")
    if not canvas.is_contiguous():
        raise ValueError(f"{op}: canvas must be contiguous (it is written in place)")
    if tokens.dtype != canvas.dtype:
        raise TypeError(f"{op}: tokens dtype {tokens.dtype} must match canvas dtype {canvas.dtype}")
    if tokens.device != canvas.device:
        raise ValueError(f"{op}: tokens on {tokens.device} but canvas on {canvas.device}")
    want = (canvas.shape[0], M * M, *canvas.shape[3:])
    if tuple(tokens.shape) != want:
        raise ValueError(f"{op}: tokens must have shape {want} for this canvas and M, got {tuple(tokens.shape)}")
    return R


def par_group_scatter_ref_(canvas: torch.Tensor, tokens: torch.Tensor, group: int, M: int) -> torch.Tensor:
    """Reference: write the M*M tokens of parallel step ``group`` (B, M*M[, C]) into the raster canvas."""
    R = _check_group_scatter(canvas, tokens, group, M)
    B, C = canvas.shape[0], canvas.shape[3:]
    b, d = divmod(group, R)
    canvas.view(B, M, R, M, R, *C)[:, :, b, :, d].copy_(tokens.reshape(B, M, M, *C))
    return canvas


# ---------------------------------------------------------------------------------------------- public ops
def par_gather(x: torch.Tensor, M: int) -> torch.Tensor:
    """Raster (B, G, G[, C]) -> PAR order (B, G*G[, C]) for M x M regions. Differentiable for float payloads."""
    G = _check_grid(x, "par_gather", "x")
    _check_M(M, G, "par_gather")
    if extension.use_kernel("par_gather", x.device):
        return torch.ops.varcore.par_gather(x, M)
    return par_gather_ref(x, M)


def par_scatter(x: torch.Tensor, M: int) -> torch.Tensor:
    """PAR order (B, G*G[, C]) -> raster (B, G, G[, C]): the inverse of :func:`par_gather`."""
    _check_tensor(x, "x")
    if x.dim() not in (2, 3):
        raise ValueError(f"par_scatter: x must be (B, L) or (B, L, C), got shape {tuple(x.shape)}")
    _check_M(M, _side_of(x.shape[1], "par_scatter"), "par_scatter")
    if extension.use_kernel("par_scatter", x.device):
        return torch.ops.varcore.par_scatter(x, M)
    return par_scatter_ref(x, M)


def par_group_scatter_(canvas: torch.Tensor, tokens: torch.Tensor, group: int, M: int) -> torch.Tensor:
    """Write the M*M tokens of parallel step ``group`` into a contiguous raster canvas in place; returns it.

    ``tokens[:, a*M + e]`` lands at raster (a*R + b, e*R + d) where (b, d) = divmod(group, R). Not differentiable.
    """
    _check_group_scatter(canvas, tokens, group, M)
    if extension.use_kernel("par_group_scatter_", canvas.device):
        torch.ops.varcore.par_group_scatter_(canvas, tokens, group, M)
        return canvas
    return par_group_scatter_ref_(canvas, tokens, group, M)


# ---------------------------------------------------------------------------------------------- fake + autograd
if extension.has_schema("par_gather"):
    @torch.library.register_fake(_GATHER)
    def _(x, M):
        G = x.shape[1]
        torch._check(x.shape[2] == G, lambda: "par_gather: x must hold a square grid")
        torch._check(G % M == 0, lambda: "par_gather: G must be a multiple of M")
        return x.new_empty((x.shape[0], G * G, *x.shape[3:]))

    @torch.library.register_fake(_SCATTER)
    def _(x, M):
        G = _side_of(x.shape[1], "par_scatter")
        return x.new_empty((x.shape[0], G, G, *x.shape[2:]))

    @torch.library.register_fake(_GROUP_SCATTER)
    def _(canvas, tokens, group, M):
        return None

    # A permutation's gradient is the inverse permutation.
    def _gather_backward(ctx, grad):
        return torch.ops.varcore.par_scatter(grad.contiguous(), ctx.M), None

    def _scatter_backward(ctx, grad):
        return torch.ops.varcore.par_gather(grad.contiguous(), ctx.M), None

    def _save_M(ctx, inputs, output):
        ctx.M = inputs[1]

    torch.library.register_autograd(_GATHER, _gather_backward, setup_context=_save_M)
    torch.library.register_autograd(_SCATTER, _scatter_backward, setup_context=_save_M)
