"""Transformer blocks of VAR: AdaLN self-attention block, FFN, L2-normalised attention, AdaLN before the head.

Module and parameter names follow the official ``basic_var.py`` so state-dict keys agree. Attention always goes
through :func:`attention`, the one place to swap in another kernel.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from varcore.ops.attention import BlockCausalMask, attend, visible_end_mask

__all__ = ["attention", "autocasting", "StaticKVCache", "KVPlan", "KVCompress", "window_attention_mass", "DropPath",
           "FFN", "SelfAttention", "AdaLNSelfAttn",
           "AdaLNBeforeHead"]


def autocasting(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (False where autocast does not exist, e.g. the meta device)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def attention(q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor,
              attn_bias, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T * scale + mask) v`` -> (B, H, Lq, c).

    q may be shorter than k and v (KV-cached inference). ``attn_bias`` is None, an additive float mask
    broadcastable to (B, H, Lq, Lk) (the official form), or a block-causal mask (query i sees keys
    ``[0, visible_end[i])``): a :class:`~varcore.ops.attention.BlockCausalMask` (as the models pass it) or an
    integer tensor ``visible_end`` of length Lq, which runs through :func:`varcore.ops.attention.attend`, except
    under autocast, where the official call runs: SDPA with the additive mask, all in the autocast dtype. q, k and
    v are cast to v's dtype first: the L2-normalised q comes out in float32 while v may be half precision.
    """
    dtype = v_BHLc.dtype
    q_BHLc, k_BHLc = q_BHLc.to(dtype), k_BHLc.to(dtype)
    if isinstance(attn_bias, BlockCausalMask) or (attn_bias is not None and not attn_bias.is_floating_point()):
        if dropout_p == 0.0 and not autocasting(v_BHLc.device):
            return attend(q_BHLc, k_BHLc, v_BHLc, visible_end=attn_bias, scale=scale)
        # the kernel has no attention dropout; under autocast the official additive mask gives the official values
        attn_bias = torch.zeros((), dtype=dtype, device=v_BHLc.device).masked_fill(
            ~visible_end_mask(attn_bias, k_BHLc.shape[2], v_BHLc.device), -torch.inf)
    if attn_bias is not None:
        attn_bias = attn_bias.to(dtype)
    return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_bias, dropout_p=dropout_p,
                                          scale=scale)


@dataclass(frozen=True)
class KVPlan:
    """Where each block's k/v go in a :class:`StaticKVCache` scale by scale, under KV-cache compression.

    ``pos[si][j]``: the tokens block j holds before scale si, where it writes that scale's k/v (in its region, or
    at a staged scale after its kept keys in the scratch); ``keep[si][j]``: the tokens block j keeps after scale si
    (None: it keeps all it holds); ``staged[si]``: whether scale si runs through the scratch; ``offsets[j]``: the
    start of block j's region; ``scratch``: the start of the scratch; ``T``: the cache length.

    The regions are ordered blocks ``depth-1 .. 0``, the scratch follows them. The scales before the first
    compressed one write into each block's region (which holds all the block's tokens then). From the first
    compressed scale on, up to the last but one, a scale is staged: block j copies its kept keys to the scratch's
    front, writes the scale's k/v after them, attends over the scratch, and writes the keys it keeps back to its
    region, which so holds only the kept keys between scales (the blocks run one after another and share the
    scratch). At the run's last scale each block writes its tokens after its kept keys in its region, over the
    regions of the blocks before it, which have finished, and the scratch. So block j's region is the most it
    holds between scales (or at a scale before the first compressed one, after writing it), the scratch the most
    any block holds at a staged scale, and ``T = max(sum_j region_j + scratch, max_j(offset_j + kept_j + last))``
    with ``last`` the tokens of the last scale; without compression that is ``depth * P + last``.

    Where that is no shorter (mild budgets on few blocks), no scale is staged and the scratch is empty: every scale
    writes into the block's region, which then holds the most the block holds at any scale but the last, new
    tokens included, and a compressed block moves its kept keys to its region's front in place.
    """

    pos: Tuple[Tuple[int, ...], ...]
    keep: Tuple[Optional[Tuple[Optional[int], ...]], ...]
    staged: Tuple[bool, ...]
    offsets: Tuple[int, ...]
    scratch: int
    T: int

    @classmethod
    def build(cls, depth: int, counts: Sequence[int], budgets: Optional[Sequence] = None,
              start: int = 0, scratch: Optional[bool] = None) -> "KVPlan":
        """The plan for ``depth`` blocks whose scales write ``counts`` tokens each, compressed by ``budgets``: per
        scale None or ``depth`` keep ratios; after scale si block j keeps ``min(held, max(1, round(r * W_si)))``
        tokens, ``W_si`` the tokens written by scales ``0..si``, ``held`` the tokens it holds then. Budgets of the
        last scale (its k/v are never read) and of the scales before ``start`` (a refiner's prefill writes them
        all at once) are not applied; the run's first scale ``start`` writes the tokens of scales ``0..start``.
        ``scratch``: None chooses the shorter layout (the one without a scratch where they tie), True or False the
        layout with or without it."""
        if scratch is not None and not isinstance(scratch, bool):
            raise TypeError(f"scratch must be None or a bool, got {type(scratch).__name__}")
        held, written, pos, keep = [0] * depth, 0, [], []
        last = len(counts) - 1
        for si, c in enumerate(counts):
            written += c
            pos.append(tuple(held))
            held = [h + c for h in held]
            if si == last:
                break
            ratios = None if budgets is None or si < start else budgets[si]
            kept = held if ratios is None else [min(h, max(1, round(r * written))) for h, r in zip(held, ratios)]
            keep.append(None if kept == held else tuple(None if k == h else k for k, h in zip(kept, held)))
            held = kept
        keep.append(None)
        first = next((si for si, k in enumerate(keep) if k is not None), last)
        layouts = [cls._layout(pos, keep, counts, start, (False,) * len(counts)),
                   cls._layout(pos, keep, counts, start, tuple(first <= si < last for si in range(len(counts))))]
        if scratch is not None:
            return layouts[scratch]
        return min(layouts, key=lambda plan: plan.T)  # the first of equals: no scratch, fewer copies

    @classmethod
    def _layout(cls, pos, keep, counts, start: int, staged: Tuple[bool, ...]) -> "KVPlan":
        """The plan whose scales ``staged`` run through the scratch (see the class docstring)."""
        depth, last = len(pos[0]), len(counts) - 1
        region, scratch = [0] * depth, 0
        for si in range(start, last):  # the scales before start are written by start's prefill
            after = [p + counts[si] for p in pos[si]]  # what each block holds once it has written scale si
            if staged[si]:
                scratch = max([scratch] + after)
                after = list(pos[si + 1])  # what it keeps
            region = [max(r, a) for r, a in zip(region, after)]
        offsets = tuple(sum(region[j + 1:]) for j in range(depth))
        T = max([sum(region) + scratch] + [o + p + counts[last] for o, p in zip(offsets, pos[last])])
        return cls(tuple(pos), tuple(keep), staged, offsets, sum(region), T)


@dataclass(frozen=True)
class KVCompress:
    """One block's KV-cache compression at one scale: the ``queries`` last queries are the scale's; its observation
    window is the ``min(4, pn)^2`` grid of them at the centres of a ``pn x pn`` map's cells (ScaleKV's 16-query
    window), or all of them where ``pn`` is None (a pruned scale, whose queries are not a grid). ``keep``: the keys
    the block keeps after the scale, those with the largest :func:`window_attention_mass`, per batch row and head
    (None: none dropped). ``staged``: the scale is staged (:class:`KVPlan`): the block's keys go through the
    cache's scratch and the kept ones (all where ``keep`` is None) back to its region. ``stats``: a list that
    receives ``(block, mass)`` (calibration only)."""

    keep: Optional[int]
    queries: int
    pn: Optional[int] = None
    stats: Optional[list] = field(default=None, compare=False, hash=False)
    staged: bool = False

    def window(self, q_BHLc: torch.Tensor) -> torch.Tensor:
        """The window's queries (B, H, w, c) among q (B, H, L, c)."""
        q_BHlc = q_BHLc[:, :, q_BHLc.shape[2] - self.queries:]
        if self.pn is None:
            return q_BHlc
        pn = self.pn
        g = min(4, pn)
        s = pn // g
        cells = slice((s - 1) // 2, (s - 1) // 2 + (g - 1) * s + 1, s)
        B, H, _, c = q_BHlc.shape
        return q_BHlc.reshape(B, H, pn, pn, c)[:, :, cells, cells].reshape(B, H, g * g, c)


def window_attention_mass(q_BHwc: torch.Tensor, k_BHnc: torch.Tensor, scale: float) -> torch.Tensor:
    """The attention probability each key gets from the window's queries, summed over them: (B, H, n) float32
    (``softmax(q k^T * scale)`` per query, in float32; the queries see every key, as a scale's queries do)."""
    logits = torch.matmul(q_BHwc.float() * scale, k_BHnc.float().transpose(-1, -2))
    return logits.softmax(dim=-1).sum(dim=-2)


class StaticKVCache:
    """Preallocated keys and values of all blocks for a CFG-doubled batch of ``batch2`` rows.

    ``k`` and ``v`` are (batch2, H, T, c) with ``T = depth * P + pn_last^2`` and ``P`` the number of tokens before
    the last scale. Block ``j`` owns positions ``[o_j, o_j + P)`` with ``o_j = (depth - 1 - j) * P``; at the last
    scale it writes its new tokens at ``[o_j + P, o_j + L)``, which is block ``j - 1``'s region (or the
    ``pn_last^2`` spare positions at the end for block 0): block ``j - 1`` has finished the last scale by then.
    ``tokens``, the number of tokens each scale writes (default ``pn^2``; fewer where a sampler prunes tokens),
    replaces the ``pn^2`` in these sizes. With ``budgets`` (KV-cache compression, see :class:`KVPlan`; ``start``:
    the run's first scale) each block's region holds only the tokens it keeps between scales: at a staged scale
    :meth:`stage` puts them and the scale's in the scratch shared by the blocks and :meth:`compact` writes the kept
    ones back. :meth:`growing` makes the cache of the official ``kv_caching`` path instead.
    """

    def __init__(self, depth: int, batch2: int, heads: int, head_dim: int, patch_nums: Sequence[int],
                 dtype: torch.dtype, device, tokens: Optional[Sequence[int]] = None,
                 budgets: Optional[Sequence] = None, start: int = 0):
        self.depth = depth
        counts = self.counts(patch_nums, tokens)
        self.P = sum(counts) - counts[-1]
        self.plan = KVPlan.build(depth, counts, budgets, start)
        self.offsets: List[int] = list(self.plan.offsets)
        self.scratch = self.plan.scratch
        self.k = torch.empty(batch2, heads, self.plan.T, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @classmethod
    def growing(cls) -> "StaticKVCache":
        """One block's cache that grows by concatenation, as official: empty until the first ``update``, then each
        update appends its k and v (whatever ``j``, ``pos`` and ``rows``) and returns everything so far."""
        cache = cls.__new__(cls)
        cache.depth, cache.P, cache.k, cache.v = 1, None, None, None
        return cache

    @staticmethod
    def counts(patch_nums: Sequence[int], tokens: Optional[Sequence[int]] = None) -> list:
        """The tokens each scale writes: ``tokens``, or ``pn^2`` per scale of ``patch_nums``."""
        if tokens is None:
            return [pn * pn for pn in patch_nums]
        if len(tokens) != len(patch_nums) or not all(0 < t <= pn * pn for t, pn in zip(tokens, patch_nums)):
            raise ValueError(f"tokens must give each of the {len(patch_nums)} scales between 1 and pn^2 tokens, "
                             f"got {list(tokens)}")
        return list(tokens)

    @classmethod
    def positions(cls, depth: int, patch_nums: Sequence[int], tokens: Optional[Sequence[int]] = None,
                  budgets: Optional[Sequence] = None, start: int = 0) -> int:
        """Cache length T (per batch row and head) for ``depth`` blocks and the schedule ``patch_nums`` (each scale
        writing ``tokens`` of its tokens, default all), compressed by ``budgets`` from ``start`` on (:class:`KVPlan`);
        ``depth * P + pn_last^2`` without compression, ``max(sum_j region_j + scratch, max_j(offset_j + kept_j +
        pn_last^2))`` with it."""
        return KVPlan.build(depth, cls.counts(patch_nums, tokens), budgets, start).T

    def update(self, j: int, pos: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, rows: slice = slice(None)):
        """Store block ``j``'s k/v of the tokens from ``pos`` on for the batch rows ``rows`` and return its k/v over
        tokens [0, pos + l) for those rows (views)."""
        if self.P is None:
            if self.k is not None:
                k_BHlc, v_BHlc = torch.cat((self.k, k_BHlc), dim=2), torch.cat((self.v, v_BHlc), dim=2)
            self.k, self.v = k_BHlc, v_BHlc
            return k_BHlc, v_BHlc
        o, end = self.offsets[j], pos + k_BHlc.shape[2]
        self.k[rows, :, o + pos:o + end].copy_(k_BHlc)
        self.v[rows, :, o + pos:o + end].copy_(v_BHlc)
        return self.k[rows, :, o:o + end], self.v[rows, :, o:o + end]

    def stage(self, j: int, held: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, rows: slice = slice(None)):
        """At a staged scale (:class:`KVPlan`): copy block ``j``'s ``held`` kept tokens from its region to the front
        of the scratch and store its k/v of the scale's tokens after them, for the batch rows ``rows``; return its
        k/v over those ``held + l`` tokens (views of the scratch)."""
        o, s, end = self.offsets[j], self.scratch, self.scratch + held + k_BHlc.shape[2]
        for buf, new in ((self.k, k_BHlc), (self.v, v_BHlc)):
            if held:
                buf[rows, :, s:s + held].copy_(buf[rows, :, o:o + held])
            buf[rows, :, s + held:end].copy_(new)
        return self.k[rows, :, s:end], self.v[rows, :, s:end]

    def compact(self, j: int, n: int, idx_BHk: Optional[torch.Tensor], rows: slice = slice(None),
                staged: bool = False) -> None:
        """Keep block ``j``'s tokens ``idx_BHk`` (ascending, per row of ``rows`` and head; None: all) of the ``n`` it
        holds, in the scratch if ``staged`` (:meth:`stage`), else in its region: they go to the front of its region,
        in order (the rest of it is free)."""
        o = self.offsets[j]
        src = self.scratch if staged else o
        for buf in (self.k, self.v):
            if idx_BHk is None:
                if staged:
                    buf[rows, :, o:o + n].copy_(buf[rows, :, src:src + n])
                continue
            kept = buf[rows, :, src:src + n].gather(2, idx_BHk.unsqueeze(-1).expand(-1, -1, -1, buf.shape[3]))
            buf[rows, :, o:o + idx_BHk.shape[2]].copy_(kept)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _cast(tensors, dtype: Optional[torch.dtype]) -> tuple:
    """The tensors as they are (autograd), or detached and cast to ``dtype`` (a sampler's copy)."""
    return tuple(tensors) if dtype is None else tuple(t.detach().to(dtype) for t in tensors)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics): in training, zero a sample's branch with probability
    ``drop_prob`` and scale the kept ones by ``1 / (1 - drop_prob)``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 -> dropout. ``fused_if_available`` is accepted for signature compatibility."""

    def __init__(self, in_features: int, hidden_features: int = None, out_features: int = None, drop: float = 0.0,
                 fused_if_available: bool = True):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def weights(self, dtype: Optional[torch.dtype] = None) -> tuple:
        """(fc1 weight, fc1 bias, fc2 weight, fc2 bias) as :meth:`step` takes them: the parameters, or (with
        ``dtype``) a detached copy in that dtype."""
        return _cast((self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x, self.weights())

    def step(self, x: torch.Tensor, w: tuple) -> torch.Tensor:
        """The FFN with the weights ``w`` (see :meth:`weights`); ``x`` is cast to their dtype."""
        x = F.linear(x.to(w[0].dtype), w[0], w[1])  # rebinding frees the input before the hidden grows
        # without autograd in place: the same values as F.gelu, without a second hidden tensor
        x = F.gelu(x, approximate="tanh") if x.requires_grad else torch.ops.aten.gelu_(x, approximate="tanh")
        x = F.linear(x, w[2], w[3])
        return self.drop(x) if self.training else x


class SelfAttention(nn.Module):
    """Multi-head self-attention with a (q, 0, v) bias and optional L2-normalised q/k.

    With ``attn_l2_norm`` q and k are unit vectors and q is multiplied by a learnable per-head temperature
    ``exp(min(scale_mul_1H11, ln 100))`` (initialised to 4); otherwise the scale is ``0.25 / sqrt(head_dim)``.
    ``kv_caching(True)`` makes every call append its k and v to a cache and attend over all of it (inference).
    ``flash_if_available`` is accepted for signature compatibility; the kernel is chosen by :func:`attention`.
    """

    def __init__(self, block_idx: int, embed_dim: int = 768, num_heads: int = 12, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_l2_norm: bool = False, flash_if_available: bool = True):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.caching = False
        self.kv_cache: Optional[StaticKVCache] = None

    def kv_caching(self, enable: bool) -> None:
        """Switch the KV cache (:meth:`StaticKVCache.growing`) on or off; either way the cache is emptied."""
        self.caching, self.kv_cache = enable, StaticKVCache.growing() if enable else None

    # the official attributes of the kv_caching path: the keys and values cached so far, (B, H, l, c) or None
    @property
    def cached_k(self) -> Optional[torch.Tensor]:
        return None if self.kv_cache is None else self.kv_cache.k

    @cached_k.setter
    def cached_k(self, k_BHlc: Optional[torch.Tensor]) -> None:
        self._growing_cache("cached_k").k = k_BHlc

    @property
    def cached_v(self) -> Optional[torch.Tensor]:
        return None if self.kv_cache is None else self.kv_cache.v

    @cached_v.setter
    def cached_v(self, v_BHlc: Optional[torch.Tensor]) -> None:
        self._growing_cache("cached_v").v = v_BHlc

    def _growing_cache(self, name: str) -> StaticKVCache:
        if self.kv_cache is None:
            raise ValueError(f"{name} can be set only while kv_caching(True) is on")
        return self.kv_cache

    def weights(self, dtype: Optional[torch.dtype] = None) -> tuple:
        """(qkv weight, qkv bias, proj weight, proj bias, L2-norm temperature or None) as :meth:`step` takes them:
        from the parameters, or (with ``dtype``) a detached copy, the first four in that dtype."""
        qkv_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp() if self.attn_l2_norm else None
        if dtype is not None and scale_mul is not None:
            scale_mul = scale_mul.detach()
        return _cast((self.mat_qkv.weight, qkv_bias, self.proj.weight, self.proj.bias), dtype) + (scale_mul,)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.step(x, self.weights(), self.kv_cache, attn_bias=attn_bias)

    def step(self, x: torch.Tensor, w: tuple, cache: Optional[StaticKVCache] = None, j: int = 0, pos: int = 0,
             rows: slice = slice(None), attn_bias: Optional[torch.Tensor] = None,
             compress: Optional[KVCompress] = None) -> torch.Tensor:
        """Attention of the tokens ``x`` (B, l, C) with the weights ``w`` (see :meth:`weights`; ``x`` is cast to
        their dtype). With a ``cache`` their k and v are stored as block ``j``'s, at token ``pos`` on, for the batch
        rows ``rows``, and the queries attend over all of that block's cached tokens. ``attn_bias`` as for
        :func:`attention`. ``compress`` (with a cache): afterwards the block keeps only the cached keys that the
        observation window attends to most (:class:`KVCompress`); at a staged scale its keys go through the
        cache's scratch (:meth:`StaticKVCache.stage`)."""
        B, L, C = x.shape
        qkv = F.linear(x.to(w[0].dtype), w[0], w[1])
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, c)
        del x, qkv  # the input dies before the attention, and qkv with the last of q, k, v
        if self.attn_l2_norm:
            # under autocast in q's dtype, as official (autocast decides: float32 on CUDA, the autocast dtype on the
            # CPU); otherwise (a reduced-precision sampler's weights) in at least float32
            if not autocasting(q.device):
                f32 = torch.promote_types(q.dtype, torch.float32)
                q, k = q.to(f32), k.to(f32)
            q = F.normalize(q, dim=-1).mul(w[4])
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = (cache.stage if compress is not None and compress.staged else cache.update)(j, pos, k, v, rows)
        out_BHLc = attention(q, k, v, attn_bias, self.scale, self.attn_drop if self.training else 0.0)
        if compress is not None:
            self._compress(compress, q, k, cache, j, rows)
        out = F.linear(out_BHLc.transpose(1, 2).reshape(B, L, C), w[2], w[3])
        return self.proj_drop(out) if self.training else out

    def _compress(self, compress: KVCompress, q: torch.Tensor, k: torch.Tensor, cache: StaticKVCache, j: int,
                  rows: slice) -> None:
        idx_BHk = None
        if compress.keep is not None or compress.stats is not None:
            mass_BHn = window_attention_mass(compress.window(q), k, self.scale)
            if compress.stats is not None:
                compress.stats.append((j, mass_BHn))
            if compress.keep is not None:
                idx_BHk = mass_BHn.topk(compress.keep, dim=-1).indices.sort(dim=-1).values
        if idx_BHk is not None or compress.staged:
            cache.compact(j, k.shape[2], idx_BHk, rows, compress.staged)

    def extra_repr(self) -> str:
        return f"attn_l2_norm={self.attn_l2_norm}"


class AdaLNSelfAttn(nn.Module):
    """Pre-LN transformer block modulated by the class condition (adaptive LayerNorm).

    The condition gives six C-vectors in the order gamma1, gamma2, scale1, scale2, shift1, shift2 (from the block's
    own ``ada_lin``, or from the shared AdaLN output plus the block's ``ada_gss`` when ``shared_aln``)::

        x = x + drop_path(attn(LN(x) * (1 + scale1) + shift1) * gamma1)
        x = x + drop_path(ffn(LN(x) * (1 + scale2) + shift2) * gamma2)

    :meth:`forward` is the official call; a sampler computes :meth:`modulations` once per call and
    :meth:`weights` once, then runs :meth:`step` with its KV cache. ``last_drop_p``, ``flash_if_available`` and
    ``fused_if_available`` are accepted for signature compatibility.
    """

    def __init__(self, block_idx: int, last_drop_p: float, embed_dim: int, cond_dim: int, shared_aln: bool,
                 norm_layer, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, attn_l2_norm: bool = False, flash_if_available: bool = False,
                 fused_if_available: bool = True):
        super().__init__()
        self.block_idx, self.last_drop_p = block_idx, last_drop_p
        self.C, self.D = embed_dim, cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(block_idx=block_idx, embed_dim=embed_dim, num_heads=num_heads,
                                  attn_drop=attn_drop, proj_drop=drop, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(in_features=embed_dim, hidden_features=round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = norm_layer(embed_dim, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def modulations(self, cond_BD: torch.Tensor) -> tuple:
        """(gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2), each (B, 1, C), from the class condition
        (B, D), or from the shared AdaLN output (B, 1, 6, C) when ``shared_aln``."""
        mods = self.ada_gss + cond_BD if self.shared_aln else self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        return gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2

    def weights(self, dtype: Optional[torch.dtype] = None) -> tuple:
        """The attention's and the FFN's weights as :meth:`step` takes them (see :meth:`SelfAttention.weights`)."""
        return self.attn.weights(dtype), self.ffn.weights(dtype)

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``cond_BD`` is the class condition (B, D), or the shared AdaLN output (B, 1, 6, C) when ``shared_aln``."""
        return self.step(x, self.modulations(cond_BD), self.weights(), self.attn.kv_cache, attn_bias=attn_bias)

    def step(self, x: torch.Tensor, mods: tuple, w: tuple, cache: Optional[StaticKVCache] = None, j: int = 0,
             pos: int = 0, rows: slice = slice(None), attn_bias: Optional[torch.Tensor] = None,
             compress: Optional[KVCompress] = None) -> torch.Tensor:
        """The block on ``x`` (B, l, C) with the :meth:`modulations` ``mods`` of its rows and the :meth:`weights`
        ``w``; ``cache``, ``j``, ``pos``, ``rows``, ``attn_bias`` and ``compress`` as for :meth:`SelfAttention.step`.
        Each branch modulates its own input, so that it dies inside the branch."""
        gamma1, gamma2, scale1p, scale2p, shift1, shift2 = mods
        h = self.attn.step(self._modulate(x, scale1p, shift1), w[0], cache, j, pos, rows, attn_bias,
                           compress) * gamma1
        x = x + (self.drop_path(h) if self.training else h)
        h = self.ffn.step(self._modulate(x, scale2p, shift2), w[1]) * gamma2
        return x + (self.drop_path(h) if self.training else h)

    def _modulate(self, x: torch.Tensor, scale1p: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        ln = self.ln_wo_grad
        return F.layer_norm(x, ln.normalized_shape, eps=ln.eps) * scale1p + shift

    def extra_repr(self) -> str:
        return f"shared_aln={self.shared_aln}"


class AdaLNBeforeHead(nn.Module):
    """Final adaptive LayerNorm: ``LN(x) * (1 + scale) + shift`` with (scale, shift) from ``ada_lin(cond_BD)``."""

    def __init__(self, C: int, D: int, norm_layer):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = norm_layer(C, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def modulations(self, cond_BD: torch.Tensor) -> tuple:
        """(1 + scale, shift), each (B, 1, C), as :meth:`modulate` takes them."""
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return 1 + scale, shift

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.modulate(x_BLC, self.modulations(cond_BD))

    def modulate(self, x_BLC: torch.Tensor, mods: tuple) -> torch.Tensor:
        ln = self.ln_wo_grad
        return F.layer_norm(x_BLC, ln.normalized_shape, eps=ln.eps) * mods[0] + mods[1]
