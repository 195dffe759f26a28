"""``VARSampler``: the fast VAR sampler (static KV cache, conditioning once per call, sync-free draws).

It takes the arguments of :meth:`varcore.models.VAR.autoregressive_infer_cfg` and, in float32, draws exactly the
same tokens for the same seed (spec ``var.md`` 2.8: the same random numbers in the same order, and the official
arithmetic op for op). What it does differently:

* **Static KV cache.** One preallocated k and one v buffer for all blocks and the CFG-doubled batch; every scale
  writes its k/v into a slice and attends over the filled prefix (no ``torch.cat``). Block ``j``'s region starts
  at ``(depth - 1 - j) * P`` (``P`` = tokens before the last scale), so at the last scale block ``j`` writes its
  new tokens over block ``j - 1``'s prefix, which nothing needs any more: the cache holds ``depth * P + pn_last^2``
  positions instead of ``depth * L`` (0.65x for d16 at 256 px), and the last scale's k/v are never kept. The eager
  path frees the cache as soon as the last scale's blocks are done, before the head and the decoder run.
* **Conditioning once.** The AdaLN modulations of every block and of the head, and ``lvl_embed + pos_1LC``, are
  computed once per call, not once per scale.
* **No host synchronisation.** The multinomial draw is done as PyTorch does it internally for one sample
  (``argmax(p / q)`` with ``q ~ Exp(1)`` from the same generator, bit-identical), with the noise drawn between the
  scale's forward pass and its draw, so both halves of the per-scale step have static shapes and no random ops:
  they can be compiled with ``torch.compile(fullgraph=True)`` or captured as CUDA graphs.
* **Reduced precision** (``dtype=torch.bfloat16`` / ``torch.float16``): the weights of the linear layers are cast
  once at construction; LayerNorm, the residual stream, the modulations, CFG and sampling stay float32 (as under the
  official autocast inference); the KV cache is stored in the low dtype. Here the arithmetic need not match the
  official order, so CFG is applied before the (linear) head, halving its cost, and top-p after top-k sorts only the
  k candidates instead of the whole vocabulary.

The weights are read when the sampler is built: build a new sampler after changing the model's weights.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union
import math
import warnings

import torch
import torch.nn.functional as F

from varcore.models import basic_var
from varcore.models.var import VAR
from varcore.models.vqvae import VQVAE
from varcore.ops import quant as quant_ops
from varcore.sampling.auto_dtype import resolve_dtype
from varcore.sampling.draw import (check_batch, check_cfg, check_images_finite, nonfinite_rows, per_scale,
                                   raise_if_nonfinite, temper, top_k_top_p_filter_)
from varcore.sampling.rng import check_seed, seeded_generator

__all__ = ["VARSampler", "StaticKVCache", "row_chunks"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK_BYTES = 64 << 20  # bound on a block's FFN hidden (or the head's logits) per row chunk
_DRAW_CHUNK_BYTES = 16 << 20  # float32 logits filtered and drawn at once
_MIN_CHUNK_ROWS = 2048  # GEMM rows per chunk, so that chunking leaves each row's float32 result unchanged


class StaticKVCache:
    """Preallocated keys and values of all blocks for a CFG-doubled batch of ``batch2`` rows.

    ``k`` and ``v`` are (batch2, H, T, c) with ``T = depth * P + pn_last^2`` and ``P`` the number of tokens before
    the last scale. Block ``j`` owns positions ``[o_j, o_j + P)`` with ``o_j = (depth - 1 - j) * P``; at the last
    scale it writes its new tokens at ``[o_j + P, o_j + L)``, which is block ``j - 1``'s region (or the
    ``pn_last^2`` spare positions at the end for block 0): block ``j - 1`` has finished the last scale by then.
    """

    def __init__(self, depth: int, batch2: int, heads: int, head_dim: int, patch_nums: Sequence[int],
                 dtype: torch.dtype, device):
        self.depth = depth
        self.L = sum(pn * pn for pn in patch_nums)
        self.P = self.L - patch_nums[-1] ** 2
        T = self.positions(depth, patch_nums)
        self.k = torch.empty(batch2, heads, T, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @staticmethod
    def positions(depth: int, patch_nums: Sequence[int]) -> int:
        """Cache length T (per batch row and head) for ``depth`` blocks and the schedule ``patch_nums``."""
        L = sum(pn * pn for pn in patch_nums)
        return depth * (L - patch_nums[-1] ** 2) + patch_nums[-1] ** 2

    def update(self, j: int, begin: int, end: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor,
               rows: slice = slice(None)):
        """Store block ``j``'s k/v of tokens [begin, end) for the batch rows ``rows`` and return its k/v over
        tokens [0, end) for those rows (views)."""
        o = (self.depth - 1 - j) * self.P
        self.k[rows, :, o + begin:o + end].copy_(k_BHlc)
        self.v[rows, :, o + begin:o + end].copy_(v_BHlc)
        return self.k[rows, :, o:o + end], self.v[rows, :, o:o + end]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass(frozen=True)
class ScaleOptions:
    """Everything that is fixed for one scale of one call (Python scalars: a compiled step specialises on them)."""

    si: int
    cfg_t: float  # guidance weight t: logits = (1 + t) cond - t uncond
    top_k: int
    top_p: float
    temperature: float
    more_smooth: bool


@dataclass
class _Weights:
    """One block's attention and FFN weights in the compute dtype (the model's own tensors in float32)."""

    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


class _CallState:
    """Per-call tensors: the modulations of each block and of the head, lvl+pos embeddings, and the KV cache."""

    def __init__(self, kv: Optional[StaticKVCache], mods, head_mods, lvl_pos_1LC):
        self.kv, self.mods, self.head_mods, self.lvl_pos_1LC = kv, mods, head_mods, lvl_pos_1LC


class VARSampler:
    """Fast class-conditional sampling with a :class:`~varcore.models.VAR` (official semantics, less time and memory).

    Args:
        var: the VAR model (put in eval mode for the duration of each call).
        vae: the VQVAE used to decode images (default: the VAR's own ``vae_proxy[0]``).
        dtype: compute dtype of the linear layers and the KV cache: ``torch.float32`` (exact: the official tokens),
            ``torch.bfloat16`` or ``torch.float16`` (weights cast once here; the rest stays float32), or ``"auto"``:
            bfloat16 where a GEMM measured on the device runs faster in it, else float32
            (:func:`varcore.sampling.auto_dtype.resolve_dtype`).
        compile: ``True`` (or a dict of ``torch.compile`` keyword arguments) compiles the per-scale step with
            ``torch.compile(fullgraph=True, dynamic=False)``; it is specialised per scale and batch size.
        decode_batch: decode at most this many images at once (None: the whole batch). The decoder's activations
            can outgrow the KV cache; chunks bound them. Tokens are unaffected, but the images then match a
            whole-batch decode only to float rounding (about 1e-5), as convolutions are not batch-invariant.
        cuda_graphs: capture each scale's step as a CUDA graph on first use and replay it afterwards (CUDA only;
            otherwise, or if capture fails, a warning is issued and the eager step is used). With graphs the KV
            cache and the per-call buffers of each batch size are kept between calls (graphs read fixed addresses).
    """

    def __init__(self, var: VAR, vae: Optional[VQVAE] = None, *, dtype: torch.dtype = torch.float32,
                 compile: Union[bool, dict] = False, decode_batch: Optional[int] = None, cuda_graphs: bool = False):
        if not isinstance(var, VAR):
            raise TypeError(f"var must be a varcore VAR, got {type(var).__name__}")
        vae = var.vae_proxy[0] if vae is None else vae
        if not isinstance(vae, VQVAE):
            raise TypeError(f"vae must be a VQVAE or None, got {type(vae).__name__}")
        _check_vae_fits(var, vae)
        dtype = resolve_dtype(dtype, var.lvl_1L.device)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES} or 'auto', got {dtype}")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {type(compile).__name__}")
        if decode_batch is not None:
            check_batch(decode_batch, "decode_batch")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        self.var, self.vae, self.dtype, self.decode_batch = var, vae, dtype, decode_batch
        self.exact = dtype == torch.float32
        self.device = var.lvl_1L.device
        self.patch_nums = tuple(var.patch_nums)
        self.SN = len(self.patch_nums)
        block0 = var.blocks[0].attn
        self.heads, self.head_dim = block0.num_heads, block0.head_dim
        self.phis = vae.quantize.phis_for(self.SN)  # resolved here: the phi table uses numpy, not traceable
        self.weights = [self._block_weights(b) for b in var.blocks]
        self.head_w = var.head.weight.detach().to(dtype)
        self.head_b = var.head.bias.detach().to(dtype)
        # per block: exp(clamped scale_mul), the L2-norm attention temperature (None without attn_l2_norm)
        self.scale_muls = [b.attn.scale_mul_1H11.clamp_max(b.attn.max_scale_mul).exp().detach()
                           if b.attn.attn_l2_norm else None for b in var.blocks]
        self._phases = {"forward": self._forward_step, "draw": self._draw_step}
        self._compiled = bool(compile)
        if compile:
            opts = compile if isinstance(compile, dict) else {}
            self._phases = {name: torch.compile(fn, fullgraph=True, dynamic=False, **opts)
                            for name, fn in self._phases.items()}
        self.cuda_graphs = cuda_graphs and self._graphs_supported()
        self._graphs: dict = {}
        self._graph_states: dict = {}

    # ------------------------------------------------------------------------------------------ setup
    def _block_weights(self, block) -> _Weights:
        a, f = block.attn, block.ffn
        qkv_b = torch.cat((a.q_bias, a.zero_k_bias, a.v_bias)).detach()
        ws = (a.mat_qkv.weight, qkv_b, a.proj.weight, a.proj.bias, f.fc1.weight, f.fc1.bias, f.fc2.weight, f.fc2.bias)
        return _Weights(*(w.detach().to(self.dtype) for w in ws))

    def _graphs_supported(self) -> bool:
        if self.device.type != "cuda":
            warnings.warn("VARSampler: cuda_graphs=True needs a CUDA model; using the eager step", stacklevel=3)
            return False
        return True

    def kv_cache_bytes(self, B: int) -> int:
        """Bytes of the KV cache for a batch of B images (2B rows with CFG)."""
        check_batch(B)
        T = StaticKVCache.positions(len(self.var.blocks), self.patch_nums)
        return 2 * 2 * B * self.heads * T * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def concat_kv_cache_bytes(self, B: int) -> int:
        """Bytes the official ``torch.cat`` cache holds at the end of a call (float32), for comparison."""
        check_batch(B)
        return 2 * 2 * B * len(self.var.blocks) * self.var.L * self.var.C * 4

    def _call_state(self, B: int, cond_B2D: torch.Tensor) -> _CallState:
        """Modulations (once per call), lvl+pos embeddings and the KV cache for a batch of B."""
        var = self.var
        C = var.C
        cond_or_gss = var.shared_ada_lin(cond_B2D)
        mods = []
        for block in var.blocks:
            m = block.ada_gss + cond_or_gss if block.shared_aln else block.ada_lin(cond_or_gss).view(-1, 1, 6, C)
            gamma1, gamma2, scale1, scale2, shift1, shift2 = m.unbind(2)
            mods.append((gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2))
        scale, shift = var.head_nm.ada_lin(cond_B2D).view(-1, 1, 2, C).unbind(2)
        lvl_pos_1LC = var.lvl_embed(var.lvl_1L) + var.pos_1LC
        fresh = (mods, (1 + scale, shift), lvl_pos_1LC)
        if not self.cuda_graphs:
            return _CallState(self._new_cache(B), *fresh)
        # graphs read fixed addresses: keep this batch size's buffers and copy the new values in
        state = self._graph_states.get(B)
        if state is None:
            state = self._graph_states[B] = _CallState(self._new_cache(B), *_map_tensors(torch.clone, fresh))
        _map_tensors(lambda dst, src: dst.copy_(src), (state.mods, state.head_mods, state.lvl_pos_1LC), fresh)
        return state

    def _new_cache(self, B: int) -> StaticKVCache:
        return StaticKVCache(len(self.var.blocks), 2 * B, self.heads, self.head_dim, self.patch_nums, self.dtype,
                             self.device)

    # ------------------------------------------------------------------------------------------ the network
    # The LayerNorm + modulation of each branch is computed inside the branch, so that no caller holds it and the
    # activations die as early as possible (it matters next to the cache at the last scale).
    def _modulated(self, x_BlC: torch.Tensor, j: int, scale1p: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        eps = self.var.blocks[j].ln_wo_grad.eps
        return (F.layer_norm(x_BlC, (x_BlC.shape[-1],), eps=eps) * scale1p + shift).to(self.dtype)

    def _attention(self, j: int, x_BlC: torch.Tensor, scale1p: torch.Tensor, shift: torch.Tensor,
                   kv: StaticKVCache, begin: int, rows: slice) -> torch.Tensor:
        w, B2, l, C = self.weights[j], x_BlC.shape[0], x_BlC.shape[1], x_BlC.shape[2]
        qkv = F.linear(self._modulated(x_BlC, j, scale1p, shift), w.qkv_w, w.qkv_b)
        q, k, v = qkv.view(B2, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (2B, H, l, c)
        attn = self.var.blocks[j].attn
        if attn.attn_l2_norm:  # float32, as under the official autocast
            q = F.normalize(q.float(), dim=-1).mul(self.scale_muls[j])
            k = F.normalize(k.float(), dim=-1)
        k_all, v_all = kv.update(j, begin, begin + l, k, v, rows)
        del qkv, k, v  # the cache holds k and v now (with L2 norm q no longer views qkv, which is freed)
        out_BHlc = basic_var.attention(q, k_all, v_all, self._attn_mask(begin, l), attn.scale)
        return F.linear(out_BHlc.transpose(1, 2).reshape(B2, l, C), w.proj_w, w.proj_b)

    def _ffn(self, j: int, x_BlC: torch.Tensor, scale1p: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        w = self.weights[j]
        hidden = F.linear(self._modulated(x_BlC, j, scale1p, shift), w.fc1_w, w.fc1_b)
        # in place: the same values as F.gelu, without a second (2B, l, 4C) tensor
        return F.linear(torch.ops.aten.gelu_(hidden, approximate="tanh"), w.fc2_w, w.fc2_b)

    def _blocks(self, x_BlC: torch.Tensor, state: _CallState, begin: int) -> torch.Tensor:
        chunks = row_chunks(*x_BlC.shape[:2], self.var.C, torch.empty((), dtype=self.dtype).element_size())
        for j in range(len(self.weights)):
            mods = state.mods[j]
            if len(chunks) == 1:
                x_BlC = self._block(j, x_BlC, mods, state.kv, begin, slice(None))
                continue
            out_BlC = torch.empty_like(x_BlC)
            for rows in chunks:
                out_BlC[rows] = self._block(j, x_BlC[rows], mods, state.kv, begin, rows)
            x_BlC = out_BlC
        return x_BlC

    def _block(self, j: int, x_BlC: torch.Tensor, mods, kv: StaticKVCache, begin: int, rows: slice) -> torch.Tensor:
        """Block ``j`` over the batch rows ``rows`` of a scale (``x_BlC`` holds just those rows)."""
        gamma1, gamma2, scale1p, scale2p, shift1, shift2 = (m[rows] for m in mods)
        x_BlC = x_BlC + self._attention(j, x_BlC, scale1p, shift1, kv, begin, rows) * gamma1
        return x_BlC + self._ffn(j, x_BlC, scale2p, shift2) * gamma2

    def _guided_logits(self, x_BlC: torch.Tensor, state: _CallState, t: float) -> torch.Tensor:
        """Float32 CFG logits (B, l, V): ``(1 + t) cond - t uncond``."""
        scale1p, shift = state.head_mods
        x = x_BlC.float()
        z = F.layer_norm(x, (x.shape[-1],), eps=self.var.head_nm.ln_wo_grad.eps) * scale1p + shift
        B = z.shape[0] // 2
        if self.exact:  # the official arithmetic: the head on both halves, then the mix (in place: the same values)
            V = self.head_w.shape[0]
            chunks = _batch_chunks(B, z.shape[1], 2 * V * 4)  # both halves' float32 logits per token
            if len(chunks) == 1:
                logits = F.linear(z, self.head_w, self.head_b).float()
                return logits[:B].mul(1 + t).sub_(logits[B:].mul_(t))  # a new tensor: the (2B, l, V) one dies
            mixed_BlV = z.new_empty(B, z.shape[1], V)
            for rows in chunks:  # the same rows' values: see row_chunks
                cond = F.linear(z[:B][rows], self.head_w, self.head_b).float()
                mixed_BlV[rows] = cond.mul_(1 + t).sub_(F.linear(z[B:][rows], self.head_w, self.head_b).mul_(t))
            return mixed_BlV
        # the head is linear (and the mix weights sum to 1), so mix first and run it on half the rows
        z_mix = (1 + t) * z[:B] - t * z[B:]
        return F.linear(z_mix.to(self.dtype), self.head_w, self.head_b).float()

    # ------------------------------------------------------------------------------------------ one scale
    # A scale runs as two functions with static shapes and no random ops, so that each can be compiled or captured
    # as a CUDA graph; the scale's random numbers are drawn between them (nothing else is random, so the official
    # draw order is kept) and the eager path frees the KV cache between them at the last scale.
    def _forward_step(self, opts: ScaleOptions, x_BlC: torch.Tensor, state: _CallState) -> torch.Tensor:
        """The blocks over one scale's tokens (2B, l, C), reading and extending the KV cache."""
        return self._blocks(x_BlC, state, self.var.begin_ends[opts.si][0])

    def _draw_step(self, opts: ScaleOptions, x_BlC: torch.Tensor, f_hat: torch.Tensor, noise_NV: torch.Tensor,
                   gumbel_BlV: Optional[torch.Tensor], state: _CallState
                   ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head, CFG, filters and the draw: returns (next scale's input or None, f_hat, idx_Bl, nonfinite), the
        last a 0-dim bool tensor set when a row of logits was not finite (checked once per call, see
        :func:`~varcore.sampling.draw.raise_if_nonfinite`).

        ``noise_NV`` (B*pn^2, V) holds the Exp(1) draws of the multinomial, ``gumbel_BlV`` those of ``more_smooth``.
        """
        var, si = self.var, opts.si
        pn = self.patch_nums[si]
        logits_BlV = self._guided_logits(x_BlC, state, opts.cfg_t)
        B, l, V = logits_BlV.shape
        logits_NV, idx_N = logits_BlV.view(-1, V), noise_NV.new_empty(B * l, dtype=torch.long)
        nonfinite_N = noise_NV.new_empty(B * l, dtype=torch.bool)
        # row by row (in chunks: the sort's values and int64 indices would triple the logits' memory at the big
        # scales, while the KV cache is full): filter in place, then draw
        for rows in _draw_chunks(B * l, V):
            chunk_NV = logits_NV[rows]
            top_k_top_p_filter_(chunk_NV, opts.top_k, opts.top_p, sort_top_k_only=not self.exact)
            nonfinite_N[rows] = nonfinite_rows(chunk_NV)
            # torch.multinomial(probs, 1) is argmax(probs / q) with q ~ Exp(1): the same draw, without host syncs
            idx_N[rows] = temper(chunk_NV, opts.temperature).softmax(dim=-1).div_(noise_NV[rows]).argmax(dim=-1)
        idx_Bl = idx_N.view(B, l)
        embedding = self.vae.quantize.embedding
        if opts.more_smooth:  # Gumbel softmax of the filtered logits, as official
            ratio = si / (self.SN - 1)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            soft_BlV = ((logits_BlV.mul(1 + ratio) + (-gumbel_BlV.log())) / tau).softmax(dim=-1)
            h_BlC = soft_BlV @ embedding.weight.unsqueeze(0)
        else:
            h_BlC = embedding(idx_Bl)
        h_BChw = h_BlC.transpose(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_BChw = quant_ops.get_next_autoregressive_input(si, f_hat, h_BChw, self.phis, self.patch_nums)
        nonfinite = nonfinite_N.any()
        if si == self.SN - 1:
            return None, f_hat, idx_Bl, nonfinite
        return self._next_input(si, next_BChw, state), f_hat, idx_Bl, nonfinite

    def _next_input(self, si: int, next_BChw: torch.Tensor, state: _CallState) -> Optional[torch.Tensor]:
        """The transformer input (2B, pn^2, C) of scale ``si + 1`` from its (B, Cvae, pn, pn) map."""
        var, B = self.var, next_BChw.shape[0]
        end, end_next = var.begin_ends[si + 1]
        next_BlC = var.word_embed(next_BChw.view(B, var.Cvae, -1).transpose(1, 2)) + state.lvl_pos_1LC[:, end:end_next]
        return next_BlC.repeat(2, 1, 1)

    def _attn_mask(self, begin: int, l: int) -> Optional[torch.Tensor]:
        """Attention mask of the ``l`` queries starting at token ``begin``: None (each scale sees the whole cache).
        CoDe's refiner overrides it for its block-causal prefill."""
        return None

    def _run(self, phase: str, opts: ScaleOptions, B: int, inputs: tuple, state: _CallState):
        """Run ``phase`` ("forward" or "draw") eagerly, compiled, or as a CUDA graph replay."""
        fn = self._phases[phase]
        if self.cuda_graphs:
            try:
                return self._graph_call((phase, B, opts), fn, opts, inputs, state)
            except RuntimeError as err:  # capture is fragile (allocator, unsupported ops): fall back for good
                warnings.warn(f"VARSampler: CUDA graph capture failed ({err}); using the eager step", stacklevel=3)
                self.cuda_graphs, self._graphs, self._graph_states = False, {}, {}
        if not self._compiled:
            return fn(opts, *inputs, state)
        # one compiled graph per phase, scale and batch size: allow that many specialisations
        with torch._dynamo.config.patch(recompile_limit=max(64, 8 * self.SN)):
            return fn(opts, *inputs, state)

    def _graph_call(self, key, fn, opts: ScaleOptions, inputs: tuple, state: _CallState):
        """Capture ``fn`` once per key (its static inputs are clones of the first call's), then replay it.

        The outputs live in the graph's memory: they stay valid until the same graph is replayed again.
        """
        entry = self._graphs.get(key)
        if entry is None:
            static_in = tuple(None if t is None else t.clone() for t in inputs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits), on copies: fn works in place
                fn(opts, *(None if t is None else t.clone() for t in static_in), state)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(opts, *static_in, state)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        return static_out

    # ------------------------------------------------------------------------------------------ public API
    @torch.no_grad()
    def sample(self, B: int, label_B: Optional[Union[int, torch.Tensor]], g_seed: Optional[int] = None,
               cfg: float = 1.5, top_k: Union[int, Sequence[int]] = 0, top_p: Union[float, Sequence[float]] = 0.0,
               more_smooth: bool = False, *, temperature: Union[float, Sequence[float]] = 1.0,
               output: str = "images", generator: Optional[torch.Generator] = None,
               per_image_seeds: bool = False, seeds: Optional[Sequence[int]] = None, progress: bool = False
               ) -> Union[torch.Tensor, List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Sample B images with classifier-free guidance; the arguments before ``*`` are the drop-in ones.

        Returns images in [0, 1], (B, 3, H, W), or with ``output="tokens"`` the list of (B, pn^2) token maps
        (the VQVAE decoder is then not run), or with ``output="both"`` the pair (images, tokens).

        ``label_B``: (B,) integer tensor, an int for all (negative = null class), or None to draw labels.
        ``g_seed`` seeds a generator on the model's device (reseeded every call, as official); None uses
        ``generator`` if given, else the global RNG. ``top_k``, ``top_p`` and ``temperature`` are scalars or one
        value per scale (CoDe); the temperature divides the filtered logits before the draw (``more_smooth`` uses
        the filtered logits, as official). ``per_image_seeds=True`` gives image i the seed ``g_seed + i``, and
        ``seeds`` gives each image its own seed (an int in [0, 2**64), every bit of which selects the stream, on the
        CPU too: :func:`varcore.sampling.rng.seeded_generator`): each image's random numbers then come from its own
        generator, so image i with seed s draws the same numbers whatever the batch size (the default keeps the
        official order, where the draws depend on B). ``g_seed`` seeds as the official code does
        (``manual_seed``: on the CPU only its low 32 bits count). ``progress`` shows a tqdm bar over scales.
        """
        check_batch(B)
        check_cfg(cfg)
        if not isinstance(more_smooth, bool):
            raise TypeError(f"more_smooth must be a bool, got {type(more_smooth).__name__}")
        if output not in ("images", "tokens", "both"):
            raise ValueError(f"output must be 'images', 'tokens' or 'both', got {output!r}")
        V = self.var.V
        top_ks = per_scale("top_k", top_k, self.SN, int, lambda v: 0 <= v <= V, f"in [0, V={V}]")
        top_ps = per_scale("top_p", top_p, self.SN, float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        temps = per_scale("temperature", temperature, self.SN, float, lambda v: v > 0 and math.isfinite(v),
                           "> 0 and finite")
        gens = self._generators(B, g_seed, generator, per_image_seeds, seeds)
        var = self.var
        was_training = (var.training, self.vae.training)
        var.eval()
        self.vae.eval()
        try:
            idx_Bl_list, f_hat = self._sample(B, label_B, gens, float(cfg), top_ks, top_ps, temps, more_smooth,
                                              progress)
            if output == "tokens":
                return idx_Bl_list
            img = check_images_finite(self._decode(f_hat), "the VAR sampler")
        finally:
            var.train(was_training[0])
            self.vae.train(was_training[1])
        return img if output == "images" else (img, idx_Bl_list)

    __call__ = sample

    def _decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from the accumulated latent, ``decode_batch`` images at a time."""
        chunk = self.decode_batch or f_hat.shape[0]
        imgs = [self.vae.fhat_to_img(f) for f in f_hat.split(chunk)]
        return (imgs[0] if len(imgs) == 1 else torch.cat(imgs)).add_(1).mul_(0.5)

    def _sample(self, B, label_B, gens, cfg, top_ks, top_ps, temps, more_smooth, progress):
        var = self.var
        label_B = self._labels(B, label_B, gens)
        cond_B2D = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
        state = self._call_state(B, cond_B2D)
        first_l = var.first_l
        x_BlC = (cond_B2D.unsqueeze(1).expand(2 * B, first_l, -1) + var.pos_start.expand(2 * B, first_l, -1)
                 + state.lvl_pos_1LC[:, :first_l])
        f_hat = cond_B2D.new_zeros(B, var.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        idx_Bl_list, nonfinite = [], torch.zeros((), dtype=torch.bool, device=self.device)
        for si in _progress(range(self.SN), progress):
            opts = ScaleOptions(si, cfg * (si / (self.SN - 1)), top_ks[si], top_ps[si], temps[si], more_smooth)
            x_BlC = self._run("forward", opts, B, (x_BlC,), state)
            if si == self.SN - 1 and not self.cuda_graphs:
                state.kv = None  # nothing reads the cache any more: free it before the head
            noise_NV, gumbel_BlV = self._noise(B, self.patch_nums[si] ** 2, var.V, more_smooth, gens)
            x_BlC, f_hat, idx_Bl, bad = self._run("draw", opts, B, (x_BlC, f_hat, noise_NV, gumbel_BlV), state)
            nonfinite = nonfinite | bad
            idx_Bl_list.append(idx_Bl.clone() if self.cuda_graphs else idx_Bl)
        raise_if_nonfinite(nonfinite, "the VAR sampler", cfg)
        return idx_Bl_list, f_hat.clone() if self.cuda_graphs else f_hat

    # ------------------------------------------------------------------------------------------ randomness
    def _generators(self, B, g_seed, generator, per_image_seeds, seeds) -> List[Optional[torch.Generator]]:
        """One generator shared by the batch (official), or one per image (batch-invariant seeding)."""
        if g_seed is not None and (isinstance(g_seed, bool) or not isinstance(g_seed, int)):
            raise TypeError(f"g_seed must be an int or None, got {type(g_seed).__name__}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if g_seed is not None or seeds is not None or per_image_seeds:
                raise ValueError("generator cannot be combined with g_seed, seeds or per_image_seeds")
            if generator.device.type != self.device.type:
                raise ValueError(f"generator is on {generator.device}, the model on {self.device}")
            return [generator]
        if not isinstance(per_image_seeds, bool):
            raise TypeError(f"per_image_seeds must be a bool, got {type(per_image_seeds).__name__}")
        if per_image_seeds:
            if seeds is not None:
                raise ValueError("give either per_image_seeds=True (with g_seed) or seeds, not both")
            if g_seed is None:
                raise ValueError("per_image_seeds=True needs g_seed (image i gets the seed g_seed + i)")
            seeds = [g_seed + i for i in range(B)]
        elif seeds is not None:
            if g_seed is not None:
                raise ValueError("give either g_seed or seeds, not both")
            seeds = list(seeds)
            if len(seeds) != B or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise ValueError(f"seeds must hold B={B} ints, got {seeds!r}")
        if seeds is not None:  # the whole seed selects the stream (see varcore.sampling.rng)
            return [seeded_generator(check_seed(s, "seeds"), self.device) for s in seeds]
        return [None if g_seed is None else torch.Generator(self.device).manual_seed(g_seed)]

    def _labels(self, B, label_B, gens) -> torch.Tensor:
        if len(gens) == 1 or label_B is not None:
            return self.var._sampling_labels(B, label_B, gens[0])
        return torch.cat([self.var._sampling_labels(1, None, g) for g in gens])

    def _noise(self, B, l, V, more_smooth, gens):
        """The scale's Exp(1) draws in the official order: the multinomial's (B*l, V), then more_smooth's (B, l, V)."""
        def draw(rows, gen):
            noise = torch.empty(rows, V, device=self.device)
            return noise.exponential_(generator=gen)

        if len(gens) == 1:
            noise_NV = draw(B * l, gens[0])
            gumbel = draw(B * l, gens[0]).view(B, l, V) if more_smooth else None
            return noise_NV, gumbel
        per_image = [(draw(l, g), draw(l, g) if more_smooth else None) for g in gens]
        noise_NV = torch.cat([n for n, _ in per_image])
        gumbel = torch.stack([g for _, g in per_image]) if more_smooth else None
        return noise_NV, gumbel


def row_chunks(B2: int, l: int, C: int, itemsize: int) -> List[slice]:
    """Batch-row chunks for one scale's blocks (2B rows of l tokens, width C): several only where the FFN
    activations would be large.

    At the big scales of a big batch a block's transient activations (the (2B, l, 4C) FFN hidden alone is 256 MiB
    for d16 at batch 32) add a sixth to the KV cache's footprint; running the block over row chunks bounds them.
    Every row's arithmetic stays the same: each GEMM keeps at least ``_MIN_CHUNK_ROWS`` rows, above which this
    machine's BLAS computes a row independently of the others (the float32 parity tests check it).
    """
    return _batch_chunks(B2, l, 4 * C * itemsize)


def _batch_chunks(n: int, l: int, token_bytes: int) -> List[slice]:
    """Chunks of n batch rows of l tokens each, so that a chunk's ``token_bytes`` per token stay under
    ``_CHUNK_BYTES`` while its GEMMs keep at least ``_MIN_CHUNK_ROWS`` rows; [slice(None)] when one chunk does."""
    chunks = min(-(-n * l * token_bytes // _CHUNK_BYTES), n * l // _MIN_CHUNK_ROWS, n)
    if chunks <= 1:
        return [slice(None)]
    size = -(-n // chunks)
    return [slice(r, min(r + size, n)) for r in range(0, n, size)]


def _draw_chunks(N: int, V: int) -> List[slice]:
    """Row chunks of the (N, V) logits for filtering and drawing (each row is independent of the others)."""
    size = max(1, _DRAW_CHUNK_BYTES // (4 * V))
    return [slice(r, min(r + size, N)) for r in range(0, N, size)]


def _map_tensors(fn, *trees):
    """Apply ``fn`` leaf-wise to nested tuples/lists of tensors (the first tree gives the structure)."""
    first = trees[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_map_tensors(fn, *items) for items in zip(*trees))
    return fn(*trees)


def _check_vae_fits(var: VAR, vae: VQVAE) -> None:
    """A VAE other than the VAR's own must share its token space: scale schedule, vocabulary, latent channels."""
    quant = vae.quantize
    mine = (tuple(var.patch_nums), var.V, var.Cvae)
    theirs = (tuple(quant.v_patch_nums), quant.vocab_size, quant.Cvae)
    if mine != theirs:
        raise ValueError(f"vae does not fit var: (patch_nums, V, Cvae) are {theirs} for the VAE and {mine} for the "
                         f"VAR")


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="VAR scales", unit="scale")
