"""Fast cached decoding for :class:`varcore.models.gpt.Transformer` (PARSampler's ``fast=True`` mode).

A sampler step feeds few rows (2 for raster decoding with CFG, 2*M*M for PAR) through the whole model, so on a CPU
the step costs about one read of the weights plus per-op overhead, and how the matrix products handle 2-32 rows
decides the speed. :class:`FastDecoder` keeps a decode-only copy of the weights laid out for that:

* every projection is packed once for a few-row matrix product: varcore's CPU kernel (:mod:`varcore.ops.linear`,
  column panels streamed once per step, the next one prefetched while the FMAs run), else oneDNN's prepacked
  linear, else ``F.linear`` (other devices and dtypes). At 8 and 32 rows ``F.linear`` on the (out, in) weight is
  2.4x and 1.8x slower than the kernel on this project's CPU;
* SwiGLU's w1 and w3 are one (2 * hidden, dim) product; q, k, v already are (``wqkv``); the RMSNorm before each
  is fused into the product (``decode_linear_rmsnorm``): after a projection has streamed its weights through the
  caches, each small op that follows costs ~100 us here instead of ~20 us, and an unfused RMSNorm is about eight;
* RoPE is one complex multiplication for q and k together, attention is SDPA over the filled cache prefix (a
  step's queries all see the same prefix, so there is no mask; 20-35% faster here than two batched matmuls and a
  softmax), KV caches are written in place;
* with CFG the two halves are mixed *before* the output head: the head is linear, so
  ``head(u + (c - u) * s) = head(u) + (head(c) - head(u)) * s`` and only B rows (not 2B) go through the
  16384-way head.

The arithmetic is the model's up to rounding (the order of additions differs), so logits agree with the parity
path to ~1e-5 but random draws can differ from the official ``generate()`` after many steps;
``tests/test_par_fast.py`` checks the logits of every step against teacher forcing and the tokens against the
parity sampler. The packed copy is taken at construction; :meth:`FastDecoder.is_current` tells whether the model's
parameters have been replaced or changed in place since (``PARSampler`` then rebuilds the decoder).
"""
import math
from typing import List

import torch
import torch.nn.functional as F

from varcore import _ext
from varcore.models.gpt import Transformer
from varcore.ops.linear import decode_linear_pack

__all__ = ["FastDecoder", "PackedLinear", "onednn_linear_available"]


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
        if cpu_f32 and _ext.use_kernel("decode_linear", weight.device):
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


class _Layer:
    """One transformer block's decode weights."""

    def __init__(self, block):
        att, ffn = block.attention, block.feed_forward
        self.n_head, self.n_kv_head, self.head_dim = att.n_head, att.n_kv_head, att.head_dim
        self.attn_norm, self.attn_eps = block.attention_norm.weight.detach(), block.attention_norm.eps
        self.ffn_norm, self.ffn_eps = block.ffn_norm.weight.detach(), block.ffn_norm.eps
        self.wqkv = PackedLinear(att.wqkv.weight)
        self.wo = PackedLinear(att.wo.weight)
        self.w13 = PackedLinear(torch.cat([ffn.w1.weight, ffn.w3.weight]))
        self.hidden = ffn.w1.weight.shape[0]
        self.w2 = PackedLinear(ffn.w2.weight)
        self.k = self.v = None


class FastDecoder:
    """Cached decoding steps of ``model`` (see the module docstring). Use :meth:`setup` before the first step of a
    sequence, then :meth:`step` for consecutive positions."""

    def __init__(self, model: Transformer):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a varcore.models.gpt.Transformer, got {type(model).__name__}")
        cfg = model.config
        self.dim, self.n_head, self.head_dim = cfg.dim, cfg.n_head, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.layers: List[_Layer] = [_Layer(block) for block in model.layers]
        self.norm, self.norm_eps = model.norm.weight.detach(), model.norm.eps
        self.head = PackedLinear(model.output.weight)
        self.dtype, self.device = model.tok_embeddings.weight.dtype, model.tok_embeddings.weight.device
        # (positions, head_dim / 2) complex rotations; zero rows for the class and transition tokens
        self.rope = torch.view_as_complex(model.freqs_cis.to(self.device, torch.float32).contiguous())
        self._visible_end = None
        self.model = model
        self._fingerprint = self._weights_fingerprint(model)
        self.rows = self.max_seq = 0

    @staticmethod
    def _weights_fingerprint(model: Transformer) -> tuple:
        # every in-place change (optimizer steps, load_state_dict, p.mul_) bumps a tensor's version counter
        return tuple((p.data_ptr(), p._version) for p in model.parameters())

    def is_current(self) -> bool:
        """Whether the packed weights still are the model's (no parameter replaced or changed since packing)."""
        return self._weights_fingerprint(self.model) == self._fingerprint

    def setup(self, rows: int, max_seq: int) -> None:
        """Allocate the KV caches for ``rows`` sequences (2B under CFG) of up to ``max_seq`` positions."""
        if rows < 1 or not 1 <= max_seq <= self.rope.shape[0]:
            raise ValueError(f"rows must be >= 1 and max_seq in [1, {self.rope.shape[0]}], got {rows}, {max_seq}")
        for layer in self.layers:
            if layer.k is None or layer.k.shape[0] != rows or layer.k.shape[2] < max_seq:
                layer.k = torch.zeros(rows, layer.n_kv_head, max_seq, layer.head_dim, dtype=self.dtype,
                                      device=self.device)
                layer.v = torch.zeros_like(layer.k)
        self._visible_end = self.model.visible_end(max_seq).tolist()
        self.rows, self.max_seq = rows, max_seq

    def release(self) -> None:
        """Free the KV caches."""
        for layer in self.layers:
            layer.k = layer.v = None
        self.rows = self.max_seq = 0

    def _rotate(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """RoPE on interleaved pairs: (R, n, H, D) real times the (n, D/2) complex rotations."""
        R, n, H, D = x.shape
        xc = torch.view_as_complex(x.reshape(R, n, H, D // 2, 2))
        return torch.view_as_real(xc * rot[None, :, None]).reshape(R, n, H, D)

    def _attention(self, layer: _Layer, h: torch.Tensor, rot: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """The attention branch (norm included) for the residual stream ``h`` (R, n, dim)."""
        R, n, _ = h.shape
        H, Hkv, D = layer.n_head, layer.n_kv_head, layer.head_dim
        qkv = layer.wqkv.normed(h.reshape(R * n, -1), layer.attn_norm, layer.attn_eps).view(R, n, H + 2 * Hkv, D)
        qk = self._rotate(qkv[:, :, :H + Hkv], rot)  # q and k in one rotation
        q = qk[:, :, :H].transpose(1, 2)                                           # (R, H, n, D)
        layer.k[:, :, start:start + n] = qk[:, :, H:].transpose(1, 2)
        layer.v[:, :, start:start + n] = qkv[:, :, H + Hkv:].transpose(1, 2)
        k, v = layer.k[:, :, :end], layer.v[:, :, :end]
        if Hkv != H:
            k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)          # (R, H, n, D)
        return layer.wo(out.transpose(1, 2).reshape(R * n, H * D)).view(R, n, -1)

    def hidden(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Final-normed hidden states (R, n, dim) for the embeddings ``h`` (R, n, dim) at positions
        [start, start + n), all of which must see the same cached prefix (one sampler step)."""
        R, n, _ = h.shape
        if R != self.rows:
            raise ValueError(f"h has {R} rows, the caches were set up for {self.rows}")
        if start < 0 or start + n > self.max_seq:
            raise ValueError(f"positions [{start}, {start + n}) exceed the caches ({self.max_seq} positions)")
        ends = self._visible_end[start:start + n]
        if min(ends) != max(ends):
            raise ValueError(f"positions [{start}, {start + n}) see different prefixes; a fast step must be one "
                             f"sampler step")
        end, rot = ends[0], self.rope[start:start + n]
        h = h.to(self.dtype).clone()
        for layer in self.layers:
            h += self._attention(layer, h, rot, start, end)
            a, b = layer.w13.normed(h.view(R * n, -1), layer.ffn_norm, layer.ffn_eps).split(layer.hidden, dim=-1)
            h += layer.w2(F.silu(a).mul_(b)).view(R, n, -1)
        return F.rms_norm(h, (self.dim,), self.norm, self.norm_eps)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, n, V) of final-normed hidden states ``z`` (B, n, dim)."""
        B, n, _ = z.shape
        return self.head(z.reshape(B * n, -1)).view(B, n, -1).float()

    def step(self, h: torch.Tensor, start: int, cfg_scale: float = 1.0, guided: bool = True) -> torch.Tensor:
        """Logits (B, n, V) of one sampler step. With ``cfg_scale > 1`` the rows of ``h`` are [cond; uncond]
        (2B) and the guided mix ``u + (c - u) * cfg_scale`` (``c`` alone when not ``guided``) is taken on the
        normed hidden states before the head."""
        z = self.hidden(h, start)
        if cfg_scale > 1.0:
            cond, uncond = z.chunk(2)
            z = torch.lerp(uncond, cond, cfg_scale) if guided else cond
        return self.logits(z)
