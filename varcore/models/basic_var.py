"""Transformer blocks of VAR: AdaLN self-attention block, FFN, L2-normalised attention, AdaLN before the head.

Module and parameter names follow the official ``basic_var.py`` so state-dict keys agree. Attention always goes
through :func:`attention`, the one place to swap in another kernel.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from varcore.ops.attention import attend, visible_end_mask

__all__ = ["attention", "DropPath", "FFN", "SelfAttention", "AdaLNSelfAttn", "AdaLNBeforeHead"]


def attention(q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor,
              attn_bias: Optional[torch.Tensor], scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T * scale + mask) v`` -> (B, H, Lq, c).

    q may be shorter than k and v (KV-cached inference). ``attn_bias`` is None, an additive float mask
    broadcastable to (B, H, Lq, Lk) (the official form), or an integer tensor ``visible_end`` of length Lq (query i
    sees keys ``[0, visible_end[i])``), which runs varcore's block-causal attention kernel when it is built (see
    :func:`varcore.ops.attention.attend`). q, k and v are cast to v's dtype first: under autocast the L2-normalised
    q and k come out in float32 while v is half precision.
    """
    dtype = v_BHLc.dtype
    q_BHLc, k_BHLc = q_BHLc.to(dtype), k_BHLc.to(dtype)
    if attn_bias is not None and not attn_bias.is_floating_point():
        if dropout_p == 0.0:
            return attend(q_BHLc, k_BHLc, v_BHLc, visible_end=attn_bias, scale=scale)
        attn_bias = torch.zeros((), dtype=dtype, device=v_BHLc.device).masked_fill(
            ~visible_end_mask(attn_bias, k_BHLc.shape[2]), -torch.inf)  # the kernel has no attention dropout
    if attn_bias is not None:
        attn_bias = attn_bias.to(dtype)
    return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_bias, dropout_p=dropout_p,
                                          scale=scale)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


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
        self.cached_k: Optional[torch.Tensor] = None
        self.cached_v: Optional[torch.Tensor] = None

    def kv_caching(self, enable: bool) -> None:
        """Switch the KV cache on or off; either way the cache is emptied."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        qkv_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias=qkv_bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, c)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        dropout_p = self.attn_drop if self.training else 0.0
        out_BHLc = attention(q, k, v, attn_bias, self.scale, dropout_p)
        return self.proj_drop(self.proj(out_BHLc.transpose(1, 2).reshape(B, L, C)))

    def extra_repr(self) -> str:
        return f"attn_l2_norm={self.attn_l2_norm}"


class AdaLNSelfAttn(nn.Module):
    """Pre-LN transformer block modulated by the class condition (adaptive LayerNorm).

    The condition gives six C-vectors in the order gamma1, gamma2, scale1, scale2, shift1, shift2 (from the block's
    own ``ada_lin``, or from the shared AdaLN output plus the block's ``ada_gss`` when ``shared_aln``)::

        x = x + drop_path(attn(LN(x) * (1 + scale1) + shift1) * gamma1)
        x = x + drop_path(ffn(LN(x) * (1 + scale2) + shift2) * gamma2)

    ``last_drop_p``, ``flash_if_available`` and ``fused_if_available`` are accepted for signature compatibility.
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

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``cond_BD`` is the class condition (B, D), or the shared AdaLN output (B, 1, 6, C) when ``shared_aln``."""
        if self.shared_aln:
            mods = self.ada_gss + cond_BD
        else:
            mods = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, attn_bias=attn_bias) * gamma1)
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2) * gamma2)
        return x

    def extra_repr(self) -> str:
        return f"shared_aln={self.shared_aln}"


class AdaLNBeforeHead(nn.Module):
    """Final adaptive LayerNorm: ``LN(x) * (1 + scale) + shift`` with (scale, shift) from ``ada_lin(cond_BD)``."""

    def __init__(self, C: int, D: int, norm_layer):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = norm_layer(C, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC) * (1 + scale) + shift
