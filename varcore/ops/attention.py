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

import contextlib
import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from varcore.ops import extension
from varcore.ops.value_checks import check_range

__all__ = [
    "block_causal_attention", "block_causal_attention_ref", "block_causal_attention_backward_ref",
    "attend", "attention_backends", "attention_backend", "use_attention_backend", "BACKENDS", "BlockCausalMask",
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


def visible_end_mask(visible_end, Lk: int, device=None) -> torch.Tensor:
    """The dense boolean mask (Lq, Lk) of ``visible_end`` (True = attend): of a tensor (on its device), or of a
    :class:`BlockCausalMask` (its cached dense form on ``device``, keys past the mask's own Lk invisible)."""
    if isinstance(visible_end, BlockCausalMask):
        return visible_end.dense(device, Lk)
    return torch.arange(Lk, device=visible_end.device) < visible_end[:, None]


class BlockCausalMask:
    """The mask "query i sees keys ``[0, ends[i])``" of one schedule, built once and passed down from the model.

    ``ends``: a sequence of ints or an integer tensor of length Lq (read once, here), each in [0, Lk]; ``Lk``: the
    number of keys (default: the largest end). The values are checked here, so that an attention call taking the
    mask reads none of them (no host synchronisation per call). The form each backend takes is built on first use
    per device and kept: the int32 ``visible_end`` tensor (varcore's kernel), the FlexAttention ``BlockMask`` and
    the dense boolean mask (SDPA). The models keep one mask per (schedule, length); the device is part of each
    form's key.
    """

    def __init__(self, ends, Lk: int = None):
        if isinstance(ends, torch.Tensor):
            if ends.dim() != 1 or ends.is_floating_point() or ends.is_complex() or ends.dtype == torch.bool:
                raise TypeError(f"ends must be a 1-D integer tensor or a sequence of ints, got a {ends.dim()}-D "
                                f"{ends.dtype} tensor")
            ends = ends.tolist()
        ends = tuple(ends)
        if not ends or any(isinstance(e, bool) or not isinstance(e, int) for e in ends):
            raise TypeError(f"ends must be a non-empty sequence of ints, got {ends[:8]!r}")
        Lk = max(ends) if Lk is None else Lk
        if isinstance(Lk, bool) or not isinstance(Lk, int) or Lk < 1:
            raise ValueError(f"Lk must be a positive int (the number of keys), got {Lk!r}")
        if min(ends) < 0 or max(ends) > Lk:
            raise ValueError(f"ends must lie in [0, Lk] = [0, {Lk}], got values in [{min(ends)}, {max(ends)}]")
        self.ends, self.Lq, self.Lk = ends, len(ends), Lk
        self._forms: dict = {}

    def __repr__(self) -> str:
        return f"BlockCausalMask(Lq={self.Lq}, Lk={self.Lk})"

    def _form(self, name: str, device, build):
        key = (name, str(torch.device("cpu" if device is None else device)))
        form = self._forms.get(key)
        if form is None:
            form = self._forms[key] = build(torch.device(key[1]))
        return form

    def visible_end(self, device=None) -> torch.Tensor:
        """The int32 (Lq,) tensor of the ends on ``device``."""
        return self._form("visible_end", device, lambda d: torch.tensor(self.ends, dtype=torch.int32, device=d))

    def dense(self, device=None, Lk: int = None) -> torch.Tensor:
        """The boolean (Lq, Lk) mask (True = attend) on ``device``, over ``Lk`` keys (default: the mask's)."""
        Lk = self.Lk if Lk is None else Lk
        return self._form(f"dense{Lk}", device, lambda d: visible_end_mask(self.visible_end(d), Lk))

    def block_mask(self, device=None):
        """The FlexAttention ``BlockMask`` on ``device``."""
        return self._form("block_mask", device, lambda d: _flex_block_mask(self.visible_end(d), self.Lk))


# ---------------------------------------------------------------------------------------------- validation
def _check_layout(layout) -> bool:
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout must be 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D), got {layout!r}")
    return layout == "blhd"


def _check_qkv(q, k, v, scale, layout, op):
    """Validates q, k, v, the scale and the layout; returns (B, H, Lq, Lk, D, blhd, scale)."""
    blhd = _check_layout(layout)
    shape = "(B, L, H, D)" if blhd else "(B, H, L, D)"
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
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
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"{op}: scale must be a finite float or None, got {scale!r}")
    return B, H, Lq, Lk, D, blhd, float(scale)


def _check_inputs(q, k, v, visible_end, scale, layout, op="block_causal_attention"):
    """Validates the arguments, the values of ``visible_end`` included (on the device for accelerator tensors);
    returns (B, H, Lq, Lk, D, blhd, scale)."""
    if not isinstance(visible_end, torch.Tensor):
        raise TypeError(f"{op}: visible_end must be a torch.Tensor, got {type(visible_end).__name__}")
    dims = _check_qkv(q, k, v, scale, layout, op)
    Lq, Lk = dims[2], dims[3]
    if visible_end.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: visible_end must be int32 or int64, got {visible_end.dtype}")
    if tuple(visible_end.shape) != (Lq,):
        raise ValueError(f"{op}: visible_end must have shape (Lq,) = ({Lq},), got {tuple(visible_end.shape)}")
    if visible_end.device != q.device:
        raise ValueError(f"{op}: visible_end is on {visible_end.device} but q on {q.device}")
    check_range(visible_end, 0, Lk + 1, f"{op}: visible_end", f"[0, Lk] = [0, {Lk}]")
    return dims


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
BACKENDS = ("kernel", "flex", "flash_attn", "sdpa")
_FORCED: list = []  # the backends forced by use_attention_backend, innermost last


def _flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _capability(device: torch.device, capability):
    if capability is not None or device.type != "cuda":
        return capability
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int):
    return torch.cuda.get_device_capability(index)  # asked once per device: attention_backend runs per call


def attention_backend(device, masked: bool, dtype=torch.float32, capability=None) -> str:
    """The implementation :func:`attend` uses on ``device`` for ``dtype``, with a mask (``masked``) or without.

    ``capability`` is the CUDA compute capability (major, minor) (default: queried from the device). Defaults:

    * CPU: masked 'kernel' (varcore's, when built) > 'sdpa' (dense boolean mask); unmasked 'sdpa'.
    * CUDA from compute capability 8.0 (the FlexAttention and flash-attn kernels' range): masked 'flex' (compiled
      FlexAttention with the mask's cached ``BlockMask``); unmasked float16/bfloat16 'flash_attn' when the
      ``flash`` extra is installed; everything else 'sdpa' (PyTorch's fused kernels). varcore's own CUDA kernel
      runs only when asked for (:func:`use_attention_backend`): no measurement on a GPU shows it ahead of these.
    * float64: 'kernel' on the CPU when built, else 'sdpa'.

    Inside :func:`use_attention_backend` the forced backend is returned wherever it can run the call (flash-attn
    has no mask: masked calls keep the default).
    """
    device = torch.device(device)
    if _FORCED and not (masked and _FORCED[-1] == "flash_attn"):
        return _FORCED[-1]
    cuda_fast = (device.type == "cuda" and dtype != torch.float64
                 and tuple(_capability(device, capability)) >= (8, 0))
    if masked:
        if device.type == "cpu" and extension.use_kernel("block_causal_attention", device):
            return "kernel"
        if cuda_fast and _flex_available():
            return "flex"
        return "sdpa"
    if cuda_fast and dtype in (torch.float16, torch.bfloat16) and _flash_attn_importable():
        return "flash_attn"
    return "sdpa"


@contextlib.contextmanager
def use_attention_backend(name: str):
    """Run :func:`attend` (every model's attention) through ``name`` inside the block: 'kernel' (varcore's),
    'flex' (FlexAttention; on the CPU it compiles C++ at first use), 'flash_attn' (unmasked calls only) or
    'sdpa'. Raises a ValueError for an unknown name or one that is not available here."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "flash_attn" and not _flash_attn_importable():
        raise ValueError("attention backend 'flash_attn' needs flash-attn: pip install 'varcore[flash]'")
    if name == "flex" and not _flex_available():
        raise ValueError(f"attention backend 'flex' needs torch.nn.attention.flex_attention (torch {torch.__version__} "
                         f"has none)")
    if name == "kernel" and extension.LIBRARY is None:
        raise ValueError("attention backend 'kernel' needs varcore's compiled extension (see varcore.info())")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def attention_backends() -> dict:
    """What :func:`attend` runs, for ``varcore.info()``: {device: {'masked': ..., 'unmasked': ...}} for float32 on
    the CPU and bfloat16 on a CUDA GPU of compute capability 9.0."""
    return {dev: {case: attention_backend(dev, case == "masked", dtype, cap) for case in ("masked", "unmasked")}
            for dev, dtype, cap in (("cpu", torch.float32, None), ("cuda", torch.bfloat16, (9, 0)))}


def attend(q, k, v, visible_end=None, scale=None, layout="bhld"):
    """Attention output for the models: block-causal with ``visible_end`` (training, CoDe prefill, PAR), or full
    attention of the queries over all keys without it (KV-cache steps). Same layouts and scale as
    :func:`block_causal_attention`; returns only the output.

    ``visible_end`` is an integer tensor (its values checked per call, on the device for accelerator tensors) or a
    :class:`BlockCausalMask` (checked when it was built; its per-device forms are cached, so a call reads no
    values and builds no mask). The backend is :func:`attention_backend`'s choice.
    """
    if isinstance(visible_end, BlockCausalMask):
        _, _, Lq, Lk, _, blhd, scale = _check_qkv(q, k, v, scale, layout, "attend")
        if (visible_end.Lq, visible_end.Lk) != (Lq, Lk):
            raise ValueError(f"attend: the mask is for (Lq, Lk) = ({visible_end.Lq}, {visible_end.Lk}), the inputs "
                             f"have ({Lq}, {Lk})")
    elif visible_end is not None:
        _, _, Lq, Lk, _, blhd, scale = _check_inputs(q, k, v, visible_end, scale, layout, "attend")
    else:
        _, _, Lq, Lk, _, blhd, scale = _check_qkv(q, k, v, scale, layout, "attend")
    backend = attention_backend(q.device, visible_end is not None, q.dtype)
    if backend == "kernel":
        if not _kernel_for(q):
            raise ValueError(f"attend: attention backend 'kernel' has no kernel for {q.dtype} on {q.device}")
        if visible_end is None:
            ends = torch.full((Lq,), Lk, dtype=torch.int32, device=q.device)
        elif isinstance(visible_end, BlockCausalMask):
            ends = visible_end.visible_end(q.device)
        else:
            ends = visible_end
        return torch.ops.varcore.block_causal_attention(q, k, v, ends, scale, layout)[0]
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        qb, kb, vb = (t if blhd else t.transpose(1, 2) for t in (q, k, v))
        out = flash_attn_func(qb, kb, vb, softmax_scale=scale)
        return out if blhd else out.transpose(1, 2)
    qh, kh, vh = (_bhld(t, blhd) for t in (q, k, v))
    if backend == "flex":
        if isinstance(visible_end, BlockCausalMask):
            block_mask = visible_end.block_mask(q.device)
        else:  # a tensor: a BlockMask of its own per call (build a BlockCausalMask to build it once)
            block_mask = None if visible_end is None else _flex_block_mask(visible_end, Lk)
        out = _flex_attention()(qh, kh, vh, block_mask=block_mask, scale=scale)
    elif visible_end is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        mask = visible_end_mask(visible_end, Lk, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        out = torch.where(mask.any(-1)[:, None], out, 0.0)  # SDPA gives NaN for a query that sees nothing
    return _bhld(out, blhd)


@functools.lru_cache(maxsize=1)
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(visible_end: torch.Tensor, Lk: int):
    """The FlexAttention BlockMask of a ``visible_end`` tensor, built on its device from its values there."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < visible_end[q_idx]

    return create_block_mask(mask_mod, None, None, visible_end.shape[0], Lk, device=visible_end.device)
