"""Block-causal attention: VAR's scale pyramid, CoDe's refiner prefill and PAR's group-causal mask.

The mask is one number per query: query ``i`` attends to keys ``[0, visible_end[i])``. The queries are the last
``Lq`` of the ``Lk`` positions (``Lq <= Lk`` for a prefill that continues a cache), and ``visible_end`` is indexed
by query. Builders: :func:`var_visible_end` (VAR training), :func:`code_prefill_visible_end` (CoDe), and
:func:`par_visible_end` (PAR training, spec ``code_par_llamagen.md`` B.3).

Layouts: ``layout="bhld"`` for (B, H, L, D) tensors, ``"blhd"`` for (B, L, H, D); any strides with a contiguous
head dimension are read in place. Outputs come in the layout of the inputs; ``lse`` (the natural-log softmax
normaliser per query) is (B, H, Lq) float32, or float64 for float64 inputs. A query that sees no key gets
output 0 and lse ``-inf``.

:func:`block_causal_attention` runs the compiled kernel (CPU, CUDA) when one is built for the device, else the
pure-PyTorch reference :func:`block_causal_attention_ref`; both are differentiable. :func:`attend` is what the
models call: it picks the fastest available implementation for the device and mask (see
:func:`attention_backends`).
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from varcore.ops import extension
from varcore.ops.value_checks import check_range

__all__ = [
    "block_causal_attention", "block_causal_attention_ref", "block_causal_attention_backward_ref",
    "attend", "attention_backends", "attention_backend",
    "scale_visible_end", "var_visible_end", "code_prefill_visible_end", "par_visible_end", "group_visible_end",
    "visible_end_mask",
]

_FWD = extension.register_op("block_causal_attention")
_BWD = extension.register_op("block_causal_attention_backward")

MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------- masks
def scale_visible_end(patch_nums, first_query_scale: int = 0, device=None) -> torch.Tensor:
    """Block-causal mask over scales of ``pn x pn`` tokens: a token sees its own scale and every earlier one.

    Keys are all ``sum(pn**2)`` tokens; queries are the tokens of scales ``first_query_scale`` onwards.
    Returns int32 (Lq,).
    """
    pns = [int(p) for p in patch_nums]
    if not pns or any(p < 1 for p in pns):
        raise ValueError(f"patch_nums must be a non-empty sequence of positive ints, got {patch_nums!r}")
    if not 0 <= first_query_scale < len(pns):
        raise ValueError(f"first_query_scale must be in [0, {len(pns)}), got {first_query_scale}")
    ends, total = [], 0
    for si, pn in enumerate(pns):
        total += pn * pn
        if si >= first_query_scale:
            ends += [total] * (pn * pn)
    return torch.tensor(ends, dtype=torch.int32, device=device)


def var_visible_end(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), device=None) -> torch.Tensor:
    """VAR training mask (680 tokens for the 256 px schedule): int32 (L,)."""
    return scale_visible_end(patch_nums, 0, device)


def code_prefill_visible_end(patch_nums, draft_steps: int, cached_scales: int = 0, device=None) -> torch.Tensor:
    """CoDe refiner prefill after ``draft_steps`` = N drafted scales: the prefix of scales 0..N (P tokens, 424 for
    N=8 at 256 px), block-causal. With ``cached_scales`` > 0 the first scales are already in the KV cache and only
    the later ones are queries (Lq < Lk = P)."""
    if not 1 <= draft_steps < len(patch_nums):
        raise ValueError(f"draft_steps must be in [1, {len(patch_nums) - 1}], got {draft_steps}")
    if not 0 <= cached_scales <= draft_steps:
        raise ValueError(f"cached_scales must be in [0, {draft_steps}], got {cached_scales}")
    return scale_visible_end(patch_nums[:draft_steps + 1], cached_scales, device)


def par_visible_end(seq_len: int, M: int, device=None) -> torch.Tensor:
    """PAR training mask over ``seq_len`` input positions (L + M*M - 1): causal over the first M*M positions, then
    blocks of M*M positions that see each other and every earlier position. int32 (seq_len,)."""
    if M < 1 or seq_len < 1:
        raise ValueError(f"M and seq_len must be positive, got M={M}, seq_len={seq_len}")
    return group_visible_end(seq_len, M * M, M * M, device=device)


def group_visible_end(seq_len: int, ar_token_num: int, group_size: int, device=None) -> torch.Tensor:
    """The official PAR mask for any ``ar_token_num`` (causal positions) and ``group_size`` (transition tokens + 1),
    int32 (seq_len,): position p < ar_token_num sees [0, p]; group i (i < seq_len // group_size) covers positions
    [ar_token_num + i * group_size, + group_size), which see each other and everything before; positions past the
    last such group are causal. ``par_visible_end`` is the case ar_token_num = group_size = M * M."""
    if ar_token_num < 1 or group_size < 1 or seq_len < 1:
        raise ValueError(f"seq_len, ar_token_num and group_size must be positive, got {seq_len}, {ar_token_num}, "
                         f"{group_size}")
    pos = torch.arange(seq_len, device=device)
    group = (pos - ar_token_num).div(group_size, rounding_mode="floor")
    in_group = (pos >= ar_token_num) & (group < seq_len // group_size)
    group_end = (ar_token_num + (group + 1) * group_size).clamp(max=seq_len)
    return torch.where(in_group, group_end, pos + 1).to(torch.int32)


def visible_end_mask(visible_end: torch.Tensor, Lk: int) -> torch.Tensor:
    """The dense boolean mask (Lq, Lk) of ``visible_end`` (True = attend)."""
    return torch.arange(Lk, device=visible_end.device) < visible_end[:, None]


# ---------------------------------------------------------------------------------------------- validation
def _check_layout(layout) -> bool:
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout must be 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D), got {layout!r}")
    return layout == "blhd"


def _check_inputs(q, k, v, visible_end, scale, layout, op="block_causal_attention"):
    """Validates the arguments; returns (B, H, Lq, Lk, D, blhd, scale)."""
    blhd = _check_layout(layout)
    shape = "(B, L, H, D)" if blhd else "(B, H, L, D)"
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (visible_end, "visible_end")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {shape}, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q on {q.device}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    l_dim, h_dim = (1, 2) if blhd else (2, 1)
    B, H, Lq, D = q.shape[0], q.shape[h_dim], q.shape[l_dim], q.shape[3]
    Lk = k.shape[l_dim]
    if (k.shape[0], k.shape[h_dim], v.shape[0], v.shape[h_dim]) != (B, H, B, H):
        raise ValueError(f"{op}: q, k and v must have the same batch and head counts {shape}, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if v.shape[l_dim] != Lk:
        raise ValueError(f"{op}: k and v must have the same length, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"{op}: q, k and v must have the same head dim, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if visible_end.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: visible_end must be int32 or int64, got {visible_end.dtype}")
    if tuple(visible_end.shape) != (Lq,):
        raise ValueError(f"{op}: visible_end must have shape (Lq,) = ({Lq},), got {tuple(visible_end.shape)}")
    if visible_end.device != q.device:
        raise ValueError(f"{op}: visible_end is on {visible_end.device} but q on {q.device}")
    check_range(visible_end, 0, Lk + 1, f"{op}: visible_end", f"[0, Lk] = [0, {Lk}]")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"{op}: scale must be a finite float or None, got {scale!r}")
    return B, H, Lq, Lk, D, blhd, float(scale)


def _bhld(t: torch.Tensor, blhd: bool) -> torch.Tensor:
    return t.transpose(1, 2) if blhd else t


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- references
def block_causal_attention_ref(q, k, v, visible_end, scale=None, layout="bhld"):
    """Reference: dense masked softmax attention in float32 (float64 for float64 inputs). Returns (out, lse)."""
    _, _, _, Lk, _, blhd, scale = _check_inputs(q, k, v, visible_end, scale, layout)
    acc = _acc_dtype(q.dtype)
    qh, kh, vh = (_bhld(t, blhd).to(acc) for t in (q, k, v))
    mask = visible_end_mask(visible_end, Lk)
    s = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    sees = mask.any(-1)
    # Rows that see nothing: probabilities 0 (not NaN), lse -inf.
    p = torch.exp(s - torch.where(sees, lse, 0.0)[..., None])
    out = (p @ vh).to(q.dtype)
    return _bhld(out, blhd).contiguous(), torch.where(sees, lse, float("-inf"))


def block_causal_attention_backward_ref(grad_out, q, k, v, out, lse, visible_end, scale=None, layout="bhld",
                                        grad_lse=None):
    """Reference gradients (dq, dk, dv) from the saved lse, by the same formulas as the kernels:
    P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O) + grad_lse), dQ = scale dS K,
    dK = scale dS^T Q."""
    _, _, _, Lk, _, blhd, scale = _check_inputs(q, k, v, visible_end, scale, layout, "block_causal_attention_backward")
    acc = _acc_dtype(q.dtype)
    qh, kh, vh, doh, oh = (_bhld(t, blhd).to(acc) for t in (q, k, v, grad_out, out))
    mask = visible_end_mask(visible_end, Lk)
    s = qh @ kh.transpose(-1, -2) * scale
    p = torch.where(mask, torch.exp(s - lse.to(acc)[..., None]), 0.0)
    delta = (doh * oh).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    ds = p * (doh @ vh.transpose(-1, -2) - delta[..., None])
    grads = (ds @ kh * scale, ds.transpose(-1, -2) @ qh * scale, p.transpose(-1, -2) @ doh)
    return tuple(_bhld(g.to(q.dtype), blhd).contiguous() for g in grads)


# ---------------------------------------------------------------------------------------------- public op
def block_causal_attention(q, k, v, visible_end, scale=None, layout="bhld"):
    """Attention where query i sees keys [0, visible_end[i]). Returns (out, lse); differentiable in q, k, v.

    q: (B, H, Lq, D) or (B, Lq, H, D) by ``layout``; k, v: the same with Lk; visible_end: int32/int64 (Lq,) with
    values in [0, Lk]; scale defaults to 1/sqrt(D). float32, float16, bfloat16 (float32 accumulation) and float64
    (CPU kernel and reference); head dims 1..256.
    """
    _, _, _, _, _, _, scale = _check_inputs(q, k, v, visible_end, scale, layout)
    if _kernel_for(q):
        return torch.ops.varcore.block_causal_attention(q, k, v, visible_end, scale, layout)
    return block_causal_attention_ref(q, k, v, visible_end, scale, layout)


def _kernel_for(q: torch.Tensor) -> bool:
    return extension.use_kernel("block_causal_attention", q.device) and (
        q.device.type == "cpu" or q.dtype != torch.float64)


if extension.has_schema("block_causal_attention"):
    @torch.library.register_fake(_FWD)
    def _(q, k, v, visible_end, scale, layout="bhld"):
        l_dim, h_dim = (1, 2) if layout == "blhd" else (2, 1)
        lse = q.new_empty((q.shape[0], q.shape[h_dim], q.shape[l_dim]), dtype=_acc_dtype(q.dtype))
        return q.new_empty(q.shape), lse

    @torch.library.register_fake(_BWD)
    def _(grad_out, q, k, v, out, lse, visible_end, scale, layout="bhld", grad_lse=None):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v, visible_end, scale, layout = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, visible_end, out, lse)
        ctx.scale, ctx.layout = scale, layout

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, visible_end, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = torch.ops.varcore.block_causal_attention_backward(
            grad_out, q, k, v, out, lse, visible_end, ctx.scale, ctx.layout, grad_lse)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- backend choice
def _flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def attention_backend(device, masked: bool, dtype=torch.float32) -> str:
    """The implementation :func:`attend` uses on ``device`` for ``dtype``, with a mask (``masked``) or without.

    masked:   'kernel' (varcore's, when built for the device) > 'flex' (compiled FlexAttention, CUDA only: on the
              CPU it needs a C++ compiler at run time and the kernel is faster) > 'sdpa' (dense boolean mask).
    unmasked: 'flash_attn' (CUDA, float16/bfloat16, when importable) > 'sdpa'.
    """
    device = torch.device(device)
    if masked:
        if extension.use_kernel("block_causal_attention", device) and (device.type == "cpu" or dtype != torch.float64):
            return "kernel"
        if device.type == "cuda" and _flex_available():
            return "flex"
        return "sdpa"
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_attn_importable():
        return "flash_attn"
    return "sdpa"


def attention_backends() -> dict:
    """What :func:`attend` runs, for ``varcore.info()``: {device: {'masked': ..., 'unmasked': ...}} for float32 on
    the CPU and bfloat16 on CUDA."""
    return {dev: {case: attention_backend(dev, case == "masked", dtype) for case in ("masked", "unmasked")}
            for dev, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16))}


def attend(q, k, v, visible_end=None, scale=None, layout="bhld"):
    """Attention output for the models: block-causal with ``visible_end`` (training, CoDe prefill, PAR), or full
    attention of the queries over all keys without it (KV-cache steps). Same layouts and scale as
    :func:`block_causal_attention`; returns only the output."""
    blhd = _check_layout(layout)
    if visible_end is not None:
        _, _, _, Lk, _, _, scale = _check_inputs(q, k, v, visible_end, scale, layout)
    elif scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    backend = attention_backend(q.device, visible_end is not None, q.dtype)
    if backend == "kernel":
        return torch.ops.varcore.block_causal_attention(q, k, v, visible_end, scale, layout)[0]
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        qb, kb, vb = (t if blhd else t.transpose(1, 2) for t in (q, k, v))
        out = flash_attn_func(qb, kb, vb, softmax_scale=scale)
        return out if blhd else out.transpose(1, 2)
    qh, kh, vh = (_bhld(t, blhd) for t in (q, k, v))
    if backend == "flex":
        out = _flex_attention()(qh, kh, vh, block_mask=_flex_block_mask(visible_end, Lk), scale=scale)
    elif visible_end is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        mask = visible_end_mask(visible_end, Lk)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        out = torch.where(mask.any(-1)[:, None], out, 0.0)  # SDPA gives NaN for a query that sees nothing
    return _bhld(out, blhd)


@functools.lru_cache(maxsize=1)
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(visible_end, Lk):
    return _cached_block_mask(str(visible_end.device), Lk, tuple(visible_end.tolist()))


@functools.lru_cache(maxsize=16)
def _cached_block_mask(device, Lk, ends):
    from torch.nn.attention.flex_attention import create_block_mask

    ends_t = torch.tensor(ends, dtype=torch.int32, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < ends_t[q_idx]

    return create_block_mask(mask_mod, None, None, len(ends), Lk, device=device)
