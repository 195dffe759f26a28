"""LlamaGen's class-conditional GPT with PAR's transition tokens (spec ``code_par_llamagen.md`` B and C).

``ModelArgs`` and ``Transformer`` keep the official field names, constructor, ``forward`` signature and state-dict
keys, so LlamaGen ``c2i_*.pt`` checkpoints (``spe_token_num=0, ar_token_num=1``) and PAR ``PAR-*.pt`` checkpoints
load with ``strict=True``. Sequences are in PAR order: with ``ar_token_num = M*M`` the G x G grid is cut into M x M
regions and one step predicts the tokens at the same offset of every region (``varcore.ops.par_order``); M = 1 is
LlamaGen's raster order.

Teacher-forced input (``forward(idx, cond_idx)``, length L + M*M - 1):
``[class, t_0 .. t_{M*M-1}, s_0 .. s_{M*M-2}, t_{M*M} .. t_{L-2}]`` where ``s_j`` are the learnable transition
tokens; output ``i`` predicts ``t_i``. The mask is group-causal (:func:`varcore.ops.attention.par_visible_end`).
Each token uses the 2-D RoPE of its own grid cell; the class and transition tokens get a zero table row, so their
queries and keys are exactly zero (inherited from LlamaGen, needed to match the checkpoints).

Differences from the official code, all deliberate:

* The teacher-forced path does not depend on ``self.training``: in eval mode it gives the same logits as in
  training mode without dropout (the official eval-mode call fails on a missing ``input_pos``).
* KV caches are plain tensors outside the module tree, so ``state_dict()`` never holds them, and cached steps attend
  over the filled prefix of the cache only (the official code attends over the whole cache with a mask).
* Only ``model_type='c2i'`` is implemented; ``cls_token_num`` must be 1 (as for every released c2i model).

Layouts the official code builds but that are inconsistent (``ar_token_num`` not a square M*M, or
``spe_token_num != ar_token_num - 1``, e.g. the default ``--ar-token-num 24`` of PAR's demo ``sample_c2i.py``) are
built as the official code builds them (RoPE laid out for ``M = isqrt(ar_token_num)``, the first ``ar_token_num``
positions causal, then groups of ``spe_token_num + 1``), with a warning.
"""
import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from varcore.ops import extension
from varcore.ops.attention import BlockCausalMask, attend, group_visible_end, visible_end_mask
from varcore.ops.linear import decode_linear_pack
from varcore.ops.par_order import par_permutation

__all__ = ["ModelArgs", "Transformer", "GPT_models", "GPT_CONFIGS", "generate", "find_multiple",
           "precompute_freqs_cis_2d", "apply_rotary_emb", "rotate_complex", "attention", "unwrap_compiled",
           "KVCache", "PackedLinear", "PackedWeights", "onednn_linear_available"]


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class ModelArgs:
    """LlamaGen/PAR model arguments (official names and defaults; PAR's 4x setting by default)."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"

    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048
    spe_token_num: int = 3
    ar_token_num: int = 4

    def __post_init__(self):
        for name in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes", "ar_token_num"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.model_type != "c2i":
            raise ValueError(f"model_type must be 'c2i' (text-conditional models are not supported), "
                             f"got {self.model_type!r}")
        if self.cls_token_num != 1:
            raise ValueError(f"cls_token_num must be 1 for class-conditional models, got {self.cls_token_num}")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be a multiple of n_head={self.n_head}")
        kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if kv < 1 or self.n_head % kv:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ValueError(f"head dim {self.dim // self.n_head} must be a multiple of 4 for the 2-D RoPE")
        G = math.isqrt(self.block_size)
        if G * G != self.block_size:
            raise ValueError(f"block_size must be a square grid G*G, got {self.block_size}")
        if isinstance(self.spe_token_num, bool) or not isinstance(self.spe_token_num, int) or self.spe_token_num < 0:
            raise ValueError(f"spe_token_num must be an int >= 0, got {self.spe_token_num!r}")
        if self.ar_token_num > self.block_size:
            raise ValueError(f"ar_token_num must be <= block_size={self.block_size}, got {self.ar_token_num}")
        M = math.isqrt(self.ar_token_num)
        if G % M:
            raise ValueError(f"the grid side {G} must be a multiple of M={M} (ar_token_num={self.ar_token_num})")
        if M * M != self.ar_token_num or self.spe_token_num != self.ar_token_num - 1:
            warnings.warn(
                f"ar_token_num={self.ar_token_num}, spe_token_num={self.spe_token_num} is not a PAR layout (M*M "
                f"tokens per step, M*M - 1 transition tokens); built as the official code builds it (RoPE for "
                f"M={M}, {self.ar_token_num} causal positions, then groups of {self.spe_token_num + 1}), which no "
                f"released model uses: the official results with it are dubious", stacklevel=3)

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def M(self) -> int:
        """Regions per side of the RoPE layout: ``isqrt(ar_token_num)`` (official ``int(ar_token_num ** 0.5)``)."""
        return math.isqrt(self.ar_token_num)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)


# ---------------------------------------------------------------------------------------------- RoPE
def precompute_freqs_cis_2d(grid_size: int, n_elem: int, base: float = 10000, cls_token_num: int = 1,
                            spe_token_num: int = 3, ar_token_num: int = 4) -> torch.Tensor:
    """The (cos, sin) table per sequence position, (cls + L + spe, n_elem // 2, 2), float32 on the CPU.

    Cell (r, c) rotates its first n_elem/4 pairs by r * f and the next n_elem/4 by c * f, with
    f = base^(-2i / (n_elem / 2)). Rows: zeros for the class tokens, the first ``ar_token_num`` cells in PAR
    order, zeros for the transition tokens, then the other cells in PAR order.
    """
    half = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half))
    t = torch.arange(grid_size, device="cpu").float()
    rows = (t[:, None] * freqs).repeat_interleave(grid_size, dim=0)   # row angle of raster cell r*G + c
    cols = (t[:, None] * freqs).repeat(grid_size, 1)                  # column angle
    angles = torch.cat([rows, cols], dim=-1)                           # (G*G, half)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    table = table[par_permutation(grid_size, math.isqrt(ar_token_num), device="cpu")]
    zeros = table.new_zeros
    return torch.cat([zeros(cls_token_num, half, 2), table[:ar_token_num], zeros(spe_token_num, half, 2),
                      table[ar_token_num:]])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, S, H, D) by the table rows (S, D/2, 2), in float32."""
    xp = x.float().unflatten(-1, (-1, 2))
    f = freqs_cis.view(1, xp.shape[1], 1, xp.shape[3], 2)
    cos, sin = f[..., 0], f[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


def rotate_complex(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE of the decode layout: interleaved pairs of x (B, S, H, D) times the complex rotations rot (S, D/2),
    one complex multiplication in x's dtype (:func:`apply_rotary_emb` up to rounding)."""
    B, S, H, D = x.shape
    xc = torch.view_as_complex(x.reshape(B, S, H, D // 2, 2))
    return torch.view_as_real(xc * rot[None, :, None]).reshape(B, S, H, D)


def attention(q, k, v, visible_end=None) -> torch.Tensor:
    """The one attention call of the model, (B, H, L, D) layout: query i sees keys [0, visible_end[i]) (a
    :class:`~varcore.ops.attention.BlockCausalMask` or an integer tensor), or every key when ``visible_end`` is
    None. The backend is :func:`varcore.ops.attention.attend`'s choice."""
    return attend(q, k, v, visible_end=visible_end, layout="bhld")


# ---------------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's prepacked linear (``mkldnn._reorder_linear_weight`` / ``_linear_pointwise``)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear:
    """``x @ weight.T`` for 2-D ``x``, the weight (out, in) packed once. ``backend``: ``'kernel'`` (varcore's
    few-row CPU kernel, :mod:`varcore.ops.linear`) for float32 CPU weights when it is built, else ``'onednn'``
    (oneDNN's prepacked linear) when torch has it, else ``'dense'`` (a contiguous copy through ``F.linear``)."""

    def __init__(self, weight: torch.Tensor):
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        cpu_f32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        if cpu_f32 and extension.use_kernel("decode_linear", weight.device):
            self.backend, self.weight = "kernel", decode_linear_pack(weight)
        elif cpu_f32 and onednn_linear_available():
            self.backend = "onednn"
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        else:
            self.backend, self.weight = "dense", weight.contiguous().clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "kernel":
            return torch.ops.varcore.decode_linear(x, self.weight, self.out_features)
        if self.backend == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)

    def normed(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``self(F.rms_norm(x, (in,), norm_weight, eps))``, one fused call on the kernel backend."""
        if self.backend == "kernel":
            return torch.ops.varcore.decode_linear_rmsnorm(x, self.weight, self.out_features, norm_weight, eps)
        return self(F.rms_norm(x, (self.in_features,), norm_weight, eps))


class PackedBlock:
    """One block in the decode layout: the q|k|v and w1|w3 products packed with their RMSNorm fused in, wo, w2."""

    def __init__(self, block: "TransformerBlock"):
        att, ffn = block.attention, block.feed_forward
        self.attn_norm, self.attn_eps = block.attention_norm.weight.detach(), block.attention_norm.eps
        self.ffn_norm, self.ffn_eps = block.ffn_norm.weight.detach(), block.ffn_norm.eps
        self.wqkv, self.wo = PackedLinear(att.wqkv.weight), PackedLinear(att.wo.weight)
        self.w13 = PackedLinear(torch.cat([ffn.w1.weight, ffn.w3.weight]))
        self.w2, self.hidden = PackedLinear(ffn.w2.weight), ffn.w1.weight.shape[0]


class PackedWeights:
    """The decode layout of a :class:`Transformer` (:meth:`Transformer.pack_for_decoding`): a copy of the weights
    for steps of few rows, passed as ``packed=`` to the model's cached passes. A sampler step feeds 2-32 rows
    through the whole model, so a step costs about one read of the weights plus per-op overhead: every projection
    is packed once for a few-row product (:class:`PackedLinear`), SwiGLU's w1 and w3 are one product, the RMSNorm
    before each product is fused into it, RoPE is one complex multiplication for q and k, and attention is SDPA
    over the filled cache prefix. The arithmetic is the model's up to rounding (logits agree to ~1e-5)."""

    def __init__(self, model: "Transformer"):
        self.blocks: List[PackedBlock] = [PackedBlock(block) for block in model.layers]
        self.norm, self.norm_eps = model.norm.weight.detach(), model.norm.eps
        self.head = PackedLinear(model.output.weight)
        device = model.tok_embeddings.weight.device
        # (positions, head_dim / 2) complex rotations; zero rows for the class and transition tokens
        self.rope = torch.view_as_complex(model.freqs_cis.to(device, torch.float32).contiguous())
        self._fingerprint = self._weights_fingerprint(model)

    @staticmethod
    def _weights_fingerprint(model: "Transformer") -> tuple:
        # every in-place change (optimizer steps, load_state_dict, p.mul_) bumps a tensor's version counter
        return tuple((p.data_ptr(), p._version) for p in model.parameters())

    def is_current(self, model: "Transformer") -> bool:
        """Whether these still are ``model``'s weights (no parameter replaced or changed in place since packing)."""
        return self._weights_fingerprint(model) == self._fingerprint


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        hidden = config.ffn_hidden
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor, packed: Optional[PackedBlock] = None) -> torch.Tensor:
        """With ``packed`` (the decode layout) ``x`` is the un-normed residual: the norm is fused into w1|w3."""
        if packed is None:
            return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))
        a, b = packed.w13.normed(x.reshape(-1, x.shape[-1]), packed.ffn_norm, packed.ffn_eps).split(packed.hidden, -1)
        return packed.w2(F.silu(a).mul_(b)).view_as(x)


class KVCache:
    """Static keys and values of one layer, (batch, n_kv_head, max_seq, head_dim), written by position. Plain
    tensors outside the module tree, so ``state_dict()`` never holds them."""

    def __init__(self, batch: int, max_seq: int, n_kv_head: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, n_kv_head, max_seq, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, n, D) at positions [start, start + n); return the prefixes [0, end)."""
        n = k.shape[2]
        self.k[:, :, start:start + n] = k
        self.v[:, :, start:start + n] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Fused-qkv multi-head attention with 2-D RoPE on q and k."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.head_dim, self.dim = config.n_head, config.head_dim, config.dim
        self.n_kv_head = config.n_head if config.n_kv_head is None else config.n_kv_head
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, freqs_cis, visible_end=None, cache_start: Optional[int] = None, cache_end: int = 0,
                packed: Optional[PackedBlock] = None):
        """``visible_end`` masks a full sequence; with ``cache_start`` the tokens sit at positions
        [cache_start, cache_start + S) of the KV cache and attend to its prefix [0, cache_end) (or, with
        ``visible_end``, query i to [0, visible_end[i])).

        In bfloat16/float16 (a model cast with ``.to(dtype)`` or run under autocast) the attention is the official
        call: ``scaled_dot_product_attention`` with a boolean (B, 1, S, keys) mask, over the whole KV cache in cached
        steps. Its half-precision kernels round differently for another key length or without a mask, so this keeps
        the tokens equal to the official ones; float32 results do not depend on it and take the shorter path.

        With ``packed`` (the decode layout, cached steps only) ``x`` is the un-normed residual (the norm is fused
        into the packed q|k|v product), ``freqs_cis`` the complex rotations (S, D/2) and the attention is SDPA
        over the cache prefix.
        """
        B, S, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if packed is None:
            q, k, v = self.wqkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = apply_rotary_emb(q.view(B, S, H, D), freqs_cis).transpose(1, 2)
            k = apply_rotary_emb(k.view(B, S, Hkv, D), freqs_cis).transpose(1, 2)
        else:
            qkv = packed.wqkv.normed(x.reshape(B * S, -1), packed.attn_norm, packed.attn_eps).view(B, S, -1, D)
            qk = rotate_complex(qkv[:, :, :H + Hkv], freqs_cis)  # q and k in one rotation
            q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv:]
        v = v.reshape(B, S, Hkv, D).transpose(1, 2)
        official_form = packed is None and q.dtype in (torch.bfloat16, torch.float16)
        if cache_start is not None:
            k, v = self.kv_cache.update(cache_start, k, v, cache_end)
            if official_form:
                k, v = self.kv_cache.k, self.kv_cache.v
                if visible_end is None:
                    visible_end = torch.full((S,), cache_end, device=x.device)
        if Hkv != H:
            k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
        dropout = self.attn_dropout_p if self.training else 0.0
        if dropout > 0 or official_form or packed is not None:
            mask = None if visible_end is None else visible_end_mask(visible_end, k.shape[2], x.device).repeat(B, 1, 1, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            out = attention(q, k, v, visible_end)
        out = out.transpose(1, 2).reshape(B * S, self.dim)
        if packed is not None:
            return packed.wo(out).view(B, S, -1)
        return self.resid_dropout(self.wo(out.view(B, S, -1)))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` in training, rescale the rest."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, config: ModelArgs, drop_path: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, freqs_cis, visible_end=None, cache_start=None, cache_end=0,
                packed: Optional[PackedBlock] = None):
        if packed is not None:  # the decode layout: norms fused into the packed products, inference only
            h = x + self.attention(x, freqs_cis, visible_end, cache_start, cache_end, packed)
            return h + self.feed_forward(h, packed)
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, visible_end, cache_start, cache_end))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    """Class embedding with the null class (row ``num_classes``) used for CFG and class dropout in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class SpecialTokenEmbedding(nn.Module):
    """PAR's learnable transition tokens s_0 .. s_{n-1}."""

    def __init__(self, num_special_tokens: int, hidden_size: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(num_special_tokens, hidden_size)

    def forward(self) -> torch.Tensor:
        return self.special_embeddings.weight


# ---------------------------------------------------------------------------------------------- transformer
class Transformer(nn.Module):
    """The LlamaGen/PAR GPT. ``forward`` has the official signature and both official paths: teacher forcing
    (``idx`` and ``cond_idx``) and cached inference after :meth:`setup_caches` (``input_pos``)."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        if not isinstance(config, ModelArgs):
            raise TypeError(f"config must be a ModelArgs, got {type(config).__name__}")
        self.config = config
        self.vocab_size, self.n_layer, self.block_size = config.vocab_size, config.n_layer, config.block_size
        self.num_classes, self.model_type, self.cls_token_num = config.num_classes, config.model_type, 1
        self.spe_token_num, self.ar_token_num, self.M = config.spe_token_num, config.ar_token_num, config.M

        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        if self.spe_token_num:  # LlamaGen checkpoints (raster, M = 1) have no transition tokens
            self.spe_tok_embeddings = SpecialTokenEmbedding(self.spe_token_num, config.dim)
        dpr = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, p) for p in dpr)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

        self.freqs_cis = precompute_freqs_cis_2d(config.grid, config.head_dim, config.rope_base, 1,
                                                 self.spe_token_num, self.ar_token_num)
        self.max_batch_size = self.max_seq_length = -1
        self._start = False
        self.initialize_weights()

    # ------------------------------------------------------------------ weights
    def initialize_weights(self) -> None:
        """Official init: normal(0, initializer_range) for Linear and Embedding weights, zero output layer."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
                nn.init.normal_(m.weight, 0.0, std)
        if not self.output.weight.is_meta:
            nn.init.zeros_(self.output.weight)

    def _rope(self, start: int, end: int, device) -> torch.Tensor:
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis[start:end]

    def transition_embeddings(self, last_tok: torch.Tensor) -> torch.Tensor:
        """The input of the first parallel step: [t_{M*M-1}, s_0 .. s_{M*M-2}] for ``last_tok`` (B, 1)."""
        emb = self.tok_embeddings(last_tok)
        if not self.spe_token_num:
            return emb
        spe = self.spe_tok_embeddings().to(emb.dtype).expand(emb.shape[0], -1, -1)
        return torch.cat([emb, spe], dim=1)

    def teacher_forcing_embeddings(self, idx: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        """[class, tok(idx[:, :M*M]), transition tokens, tok(idx[:, M*M:])] (B, 1 + n + M*M - 1, dim)."""
        cond = self.cls_embedding(cond_idx, train=self.training)
        tok = self.tok_embeddings(idx)
        parts = [cond, tok[:, :self.ar_token_num]]
        if self.spe_token_num:
            parts.append(self.spe_tok_embeddings().to(tok.dtype).expand(tok.shape[0], -1, -1))
        parts.append(tok[:, self.ar_token_num:])
        return torch.cat(parts, dim=1)

    def pack_for_decoding(self) -> PackedWeights:
        """The weights in the decode layout (:class:`PackedWeights`), for ``packed=`` of the cached passes."""
        return PackedWeights(self)

    # ------------------------------------------------------------------ passes
    def logits(self, z: torch.Tensor, packed: Optional[PackedWeights] = None) -> torch.Tensor:
        """Float32 logits (B, n, V) of final-normed hidden states ``z`` (B, n, dim)."""
        if packed is None:
            return self.output(z).float()
        B, n, _ = z.shape
        return packed.head(z.reshape(B * n, -1)).view(B, n, -1).float()

    def forward_teacher(self, idx: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, len(idx) + 1, V): output i predicts token i in PAR order."""
        _check_long(idx, "idx", 2)
        _check_long(cond_idx, "cond_idx", 1)
        if idx.shape[0] != cond_idx.shape[0]:
            raise ValueError(f"idx and cond_idx must have the same batch size, got {idx.shape[0]} and "
                             f"{cond_idx.shape[0]}")
        if idx.shape[1] > self.block_size - 1:
            raise ValueError(f"idx must hold at most block_size - 1 = {self.block_size - 1} tokens, "
                             f"got {idx.shape[1]}")
        h = self.tok_dropout(self.teacher_forcing_embeddings(idx, cond_idx))
        S = h.shape[1]
        freqs = self._rope(0, S, h.device)
        visible_end = self.block_mask(S)
        for layer in self.layers:
            h = layer(h, freqs, visible_end)
        # the last M*M - 1 outputs would predict tokens past the grid: keep len(idx) + 1
        return self.logits(self.norm(h))[:, :idx.shape[1] + 1]

    def visible_end(self, seq_len: int, device=None) -> torch.Tensor:
        """The official group-causal mask over ``seq_len`` positions as "position p sees [0, visible_end[p])":
        causal over the first ``ar_token_num`` positions, then groups of ``spe_token_num + 1``."""
        return group_visible_end(seq_len, self.ar_token_num, self.spe_token_num + 1, device=device)

    def block_mask(self, seq_len: int) -> BlockCausalMask:
        """:meth:`visible_end`'s mask over ``seq_len`` positions, built once per length and kept."""
        return self._mask(("train", seq_len), lambda: (self.visible_end(seq_len), seq_len))

    def _mask(self, key, ends_and_keys) -> BlockCausalMask:
        masks = self.__dict__.setdefault("_block_masks", {})
        if key not in masks:
            masks[key] = BlockCausalMask(*ends_and_keys())
        return masks[key]

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype) -> None:
        """Allocate static KV caches for ``max_batch_size`` rows (2B under CFG) and ``max_seq_length`` positions
        (rounded up to a multiple of 8, as official) on the model's device."""
        if max_seq_length < 1 or max_batch_size < 1:
            raise ValueError(f"max_batch_size and max_seq_length must be >= 1, got {max_batch_size}, "
                             f"{max_seq_length}")
        self.max_seq_length = find_multiple(max_seq_length, 8)
        self.max_batch_size = max_batch_size
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            att = layer.attention
            att.kv_cache = KVCache(max_batch_size, self.max_seq_length, att.n_kv_head, att.head_dim, dtype, device)
        self._visible_end = self.visible_end(self.max_seq_length).tolist()
        self._start = False

    def clear_caches(self) -> None:
        """Free the KV caches."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size = self.max_seq_length = -1

    def hidden_cached(self, h: torch.Tensor, start: int, packed: Optional[PackedWeights] = None) -> torch.Tensor:
        """Final-normed hidden states (B, n, dim) of the embeddings ``h`` (B, n, dim) at positions
        [start, start + n), attending to the KV cache, through the model's modules or, with ``packed``, their
        decode layout. A sampler step's queries all see the same prefix and need no mask; positions that see
        different prefixes (a multi-position call across groups) are masked."""
        if self.layers[0].attention.kv_cache is None:
            raise RuntimeError("call setup_caches() before cached inference")
        n = h.shape[1]
        if start < 0 or start + n > self.max_seq_length:
            raise ValueError(f"positions [{start}, {start + n}) exceed the caches ({self.max_seq_length} positions)")
        if h.shape[0] != self.max_batch_size:
            raise ValueError(f"batch {h.shape[0]} must equal the cache batch {self.max_batch_size}")
        ends = self._visible_end[start:start + n]
        end = max(ends)
        # positions of several groups: the mask of these positions (kept per place while the caches last)
        visible_end = None if min(ends) == end else self._mask(("cached", self.max_seq_length, start, n),
                                                               lambda: (ends, end))
        if packed is None:
            freqs = self._rope(start, start + n, h.device)
            for layer in self.layers:
                h = layer(h, freqs, visible_end, start, end)
            return self.norm(h)
        rot = packed.rope[start:start + n]
        for layer, block in zip(self.layers, packed.blocks):
            h = layer(h, rot, visible_end, start, end, block)
        return F.rms_norm(h, (h.shape[-1],), packed.norm, packed.norm_eps)

    def forward_cached(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (B, n, V) of :meth:`hidden_cached` through the model's modules."""
        return self.logits(self.hidden_cached(h, start))

    def forward(self, idx: Optional[torch.Tensor], cond_idx: Optional[torch.Tensor],
                input_pos: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None):
        """Official entry point; returns ``(logits, loss)``.

        * ``idx`` and ``cond_idx``: teacher forcing; logits (B, L, V) for ``idx`` = codes[:, :-1] in PAR order,
          loss = cross-entropy against ``targets`` (mean, or over the rows flagged by ``valid``).
        * ``cond_idx`` only: prefill of the class token at ``input_pos`` [0] (after :meth:`setup_caches`).
        * ``idx`` only: a cached step at ``input_pos``; the first multi-token call after the prefill is the
          transition step, which embeds only the last given token followed by the transition tokens.
        """
        if mask is not None:
            raise ValueError("mask is not supported: the model builds its own group-causal mask")
        if idx is not None and cond_idx is not None:
            logits = self.forward_teacher(idx, cond_idx)
            loss = None
            if targets is not None:
                _check_long(targets, "targets", 2)
                if targets.shape != logits.shape[:2]:
                    raise ValueError(f"targets must have shape {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="none" if valid is not None else "mean")
                if valid is not None:
                    w = valid[:, None].expand_as(targets).reshape(-1).to(ce.dtype)
                    ce = (ce * w).sum() / w.sum().clamp(min=1)
                loss = ce
            return logits, loss
        if input_pos is None:
            raise ValueError("input_pos is required for cached inference (idx or cond_idx is None)")
        pos = input_pos.reshape(-1).tolist()
        if pos != list(range(pos[0], pos[0] + len(pos))):
            raise ValueError(f"input_pos must be consecutive positions, got {pos}")
        if cond_idx is not None:
            _check_long(cond_idx, "cond_idx", 1)
            self._start = False
            h = self.cls_embedding(cond_idx, train=False)
        elif idx is not None:
            _check_long(idx, "idx", 2)
            if idx.shape[1] > 1 and not self._start:
                h = self.transition_embeddings(idx[:, -1:])
                self._start = True
            else:
                h = self.tok_embeddings(idx)
        else:
            raise ValueError("pass idx, cond_idx or both")
        if h.shape[1] != len(pos):
            raise ValueError(f"input_pos has {len(pos)} positions for {h.shape[1]} input embeddings")
        return self.forward_cached(h, pos[0]), None


def _check_long(x, name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------- configs
GPT_CONFIGS = {  # name: (n_layer, n_head, dim)
    "GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280), "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560), "GPT-1B": (22, 32, 2048), "GPT-3B": (24, 32, 3200), "GPT-7B": (32, 32, 4096),
}


def _builder(name: str, args_class=ModelArgs):
    n_layer, n_head, dim = GPT_CONFIGS[name]

    def build(**kwargs) -> Transformer:
        return Transformer(args_class(n_layer=n_layer, n_head=n_head, dim=dim, **kwargs))

    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"{name}: {n_layer} layers, {n_head} heads, width {dim}; keyword arguments go to ModelArgs."
    return build


GPT_models = {name: _builder(name) for name in GPT_CONFIGS}
GPT_B, GPT_L, GPT_XL, GPT_XXL, GPT_XXXL, GPT_1B, GPT_3B, GPT_7B = GPT_models.values()


def unwrap_compiled(model):
    """The module under a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else ``model`` itself."""
    return getattr(model, "_orig_mod", model) if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) \
        else model


def generate(model: Transformer, cond: torch.Tensor, max_new_tokens: int, emb_masks=None, cfg_scale: float = 1.0,
             cfg_interval: float = -1, ar_token_num: int = 4, spe_token_num: int = 3, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, sample_logits: bool = True) -> torch.Tensor:
    """PAR's ``generate`` (official signature): int32 tokens (B, max_new_tokens) in PAR order; the sampling loop
    is :func:`varcore.sampling.par.generate`."""
    from varcore.sampling import par  # the sampler builds on this module

    return par.generate(model, cond, max_new_tokens, emb_masks=emb_masks, cfg_scale=cfg_scale,
                        cfg_interval=cfg_interval, ar_token_num=ar_token_num, spe_token_num=spe_token_num,
                        temperature=temperature, top_k=top_k, top_p=top_p, sample_logits=sample_logits)
