"""The one VAR sampling loop: :class:`VARSampler` (static KV cache, conditioning once per call, sync-free draws)
and the drop-in :func:`autoregressive_infer_cfg` on it.

Both take the arguments of :meth:`varcore.models.VAR.autoregressive_infer_cfg` and, in float32, draw exactly the
official tokens for the same seed (spec ``var.md`` 2.8: the same random numbers in the same order, and the official
arithmetic op for op). The model's blocks run through :meth:`~varcore.models.basic_var.AdaLNSelfAttn.step`; what
the loop adds to the official one:

* **Static KV cache** (:class:`~varcore.models.basic_var.StaticKVCache`). One preallocated k and one v buffer for
  all blocks and the CFG-doubled batch; every scale writes its k/v into a slice and attends over the filled prefix
  (no ``torch.cat``). Block ``j``'s region starts at ``(depth - 1 - j) * P`` (``P`` = tokens before the last
  scale), so at the last scale block ``j`` writes its new tokens over block ``j - 1``'s prefix, which nothing needs
  any more: the cache holds ``depth * P + pn_last^2`` positions instead of ``depth * L`` (0.65x for d16 at 256 px),
  and the last scale's k/v are never kept. The eager path frees the cache as soon as the last scale's blocks are
  done, before the head and the decoder run.
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

A run may also stop early or start late (:meth:`VARSampler.run`): CoDe's drafter and refiner are two such runs.
The weights are read when the sampler is built: build a new sampler after changing the model's weights.
"""
from contextlib import contextmanager
import math
from dataclasses import dataclass, replace
from numbers import Real
from typing import Dict, List, Optional, Sequence, Tuple, Union
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from varcore.models.basic_var import KVCompress, StaticKVCache
from varcore.models.var import VAR
from varcore.models.vqvae import VQVAE
from varcore.ops import quant as quant_ops
from varcore.ops.attention import BlockCausalMask, code_prefill_visible_end
from varcore.sampling.auto_dtype import resolve_dtype
from varcore.sampling.draw import (check_batch, check_bool, check_draw, check_images_finite, check_number, class_labels,
                                   guide_var, inverse_cdf_index, inverse_cdf_uniforms, nonfinite_rows,
                                   raise_if_nonfinite, scale_options, temper, top_k_top_p_filter_)
from varcore.sampling.rng import generators, model_generator

__all__ = ["VARSampler", "StaticKVCache", "ScaleOptions", "autoregressive_infer_cfg", "row_chunks", "keep_counts",
           "kv_budgets", "kv_split", "kv_plan_from_attention"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK_BYTES = 64 << 20  # bound on a block's FFN hidden (or the head's logits) per row chunk
_DRAW_CHUNK_BYTES = 16 << 20  # float32 logits filtered and drawn at once
_MIN_CHUNK_ROWS = 2048  # GEMM rows per chunk, so that chunking leaves each row's float32 result unchanged


@dataclass(frozen=True)
class ScaleOptions:
    """Everything that is fixed for one scale of one call (Python scalars: a compiled step specialises on them)."""

    si: int
    cfg_t: float  # guidance weight t: logits = (1 + t) cond - t uncond
    top_k: int
    top_p: float
    temperature: float
    more_smooth: bool
    prefill: bool = False  # the forward runs over the tokens of scales 0..si at once (a run starting at si > 0)
    embed_next: bool = True  # the draw embeds the next scale's transformer input (not at a run's last scale)
    guided: bool = True  # both halves of the CFG batch; False: the conditional half only (logits = conditional)
    guided_next: bool = True  # the next scale's input is embedded for both halves
    keep: Optional[int] = None  # tokens run through the blocks (pruning, see keep_counts); None: all pn^2
    cache_pos: Optional[int] = None  # where the scale's k/v start in the KV cache; None: at the scale's first token
    kv_ratio: Optional[Tuple[float, ...]] = None  # KV-cache compression after this scale: a keep ratio per block
    kv_pos: Optional[Tuple[int, ...]] = None  # with compression: where each block writes the scale's k/v
    kv_keep: Optional[Tuple[Optional[int], ...]] = None  # with compression: the keys each block keeps (None: all)
    kv_stage: bool = False  # with compression: the scale runs through the cache's scratch (KVPlan.staged)
    kv_measure: bool = False  # record each block's window attention (KVPlan calibration, see VARSampler.kv_plan)
    draw: str = "multinomial"  # the official draw (one Exp(1) per code) or "inverse_cdf" (one uniform per token)


def keep_counts(prune, patch_nums: Sequence[int]) -> List[Optional[int]]:
    """The tokens each scale runs through the blocks under the token-pruning option ``prune`` (see
    :meth:`VARSampler.sample`): None where a scale keeps all its tokens.

    ``prune`` is None or empty (no pruning), a dict ``{scale index: keep ratio}`` or a sequence of one keep ratio
    per scale, every ratio a real number in (0, 1]. Scale ``si`` keeps ``max(1, round(ratio * pn^2))`` tokens
    (Python's ``round``: halves to even); a count of ``pn^2`` (ratio 1.0) leaves the scale unpruned.
    """
    SN = len(patch_nums)
    expected = (f"prune must be None, a dict {{scale index in [0, {SN - 1}]: keep ratio in (0, 1]}} or a sequence of "
                f"{SN} keep ratios in (0, 1]")
    ratios = _scale_entries(prune, SN, expected, "values")
    keeps: List[Optional[int]] = [None] * SN
    for si, ratio in ratios.items():
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 < ratio <= 1:
            raise ValueError(f"{expected}, got {ratio!r} at scale {si}")
        tokens = patch_nums[si] ** 2
        keep = max(1, round(ratio * tokens))
        keeps[si] = keep if keep < tokens else None
    return keeps


def _scale_entries(value, n: int, expected: str, what: str) -> dict:
    """``{scale index: entry}`` of a per-scale option: None (off), a dict with indices in [0, n) or a sequence of
    n entries (empty: off); a ValueError starting with ``expected`` for anything else."""
    if value is None:
        return {}
    if isinstance(value, dict):
        for si in value:
            if isinstance(si, bool) or not isinstance(si, int) or not 0 <= si < n:
                raise ValueError(f"{expected}, got the scale index {si!r}")
        return value
    if isinstance(value, (list, tuple)):
        if value and len(value) != n:
            raise ValueError(f"{expected}, got {len(value)} {what}")
        return dict(enumerate(value))
    raise ValueError(f"{expected}, got {type(value).__name__} {value!r}")


def kv_budgets(kv_budget, patch_nums: Sequence[int], depth: int) -> List[Optional[Tuple[float, ...]]]:
    """The per-block keep ratios after each scale under the KV-cache compression option ``kv_budget`` (see
    :meth:`VARSampler.sample`): None where a scale compresses nothing.

    ``kv_budget`` is None or empty (off), a dict ``{scale index: ratio}`` or a sequence of one entry per scale but
    the last (whose k/v are never read), an entry being None (no compression there), one keep ratio for every block
    or a sequence of ``depth`` ratios (one per block, as :meth:`VARSampler.kv_plan` gives them); every ratio is a
    real number in (0, 1]. After scale ``si`` block ``j`` keeps ``min(held, max(1, round(ratio * W)))`` keys, ``W``
    the tokens scales ``0..si`` wrote and ``held`` the keys it holds (:class:`~varcore.models.basic_var.KVPlan`).
    """
    SN = len(patch_nums)
    expected = (f"kv_budget must be None, a dict {{scale index in [0, {SN - 2}]: keep ratio in (0, 1] or {depth} "
                f"of them}} or a sequence of {SN - 1} such entries")
    entries = _scale_entries(kv_budget, SN - 1, expected, "entries")

    def ratio(r, si):
        if isinstance(r, bool) or not isinstance(r, Real) or not 0 < r <= 1:
            raise ValueError(f"{expected}, got {r!r} at scale {si}")
        return float(r)

    budgets: List[Optional[Tuple[float, ...]]] = [None] * SN
    for si, entry in entries.items():
        if entry is None:
            continue
        if isinstance(entry, (list, tuple)):
            if len(entry) != depth:
                raise ValueError(f"{expected}, got {len(entry)} ratios at scale {si}")
            budgets[si] = tuple(ratio(r, si) for r in entry)
        else:
            budgets[si] = (ratio(entry, si),) * depth
    return budgets


class _CallState:
    """Per-call tensors of a run ``key = (B, start, stop)``: the class embeddings of the CFG batch, the modulations
    of each block and of the head, lvl+pos embeddings, the KV cache, and a prefill's block-causal mask
    (a :class:`~varcore.ops.attention.BlockCausalMask`, or None)."""

    def __init__(self, key, cond_B2D, kv: Optional[StaticKVCache], mods, head_mods, lvl_pos_1LC, visible_end):
        self.key, self.cond_B2D, self.kv, self.mods, self.head_mods = key, cond_B2D, kv, mods, head_mods
        self.lvl_pos_1LC, self.visible_end = lvl_pos_1LC, visible_end
        self.kv_stats: Optional[dict] = None  # {scale: [(block, window attention mass)]} while calibrating


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
        cuda_graphs: capture each scale's forward pass as a CUDA graph on first use and replay it afterwards
            (CUDA only; otherwise, or if capture fails, a warning says why and the eager step is used). The graphs
            are keyed by shapes only (:meth:`graph_key`) and share one memory pool; the draw runs eagerly. With
            graphs the KV cache and the per-call buffers of each batch size are kept between calls (graphs read
            fixed addresses).
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
        check_bool(cuda_graphs, "cuda_graphs")
        self.var, self.vae, self.dtype, self.decode_batch = var, vae, dtype, decode_batch
        self.exact = dtype == torch.float32
        self.device = var.lvl_1L.device
        self.patch_nums = tuple(var.patch_nums)
        self.SN = len(self.patch_nums)
        block0 = var.blocks[0].attn
        self.heads, self.head_dim = block0.num_heads, block0.head_dim
        self.phis = vae.quantize.phis_for(self.SN)  # resolved here: the phi table uses numpy, not traceable
        self.weights = [block.weights(dtype) for block in var.blocks]
        self.head_w = var.head.weight.detach().to(dtype)
        self.head_b = var.head.bias.detach().to(dtype)
        self._phases = {"forward": self.forward, "draw": self.draw}
        self._compiled = bool(compile)
        if compile:
            opts = compile if isinstance(compile, dict) else {}
            self._phases = {name: torch.compile(fn, fullgraph=True, dynamic=False, **opts)
                            for name, fn in self._phases.items()}
        self.cuda_graphs = cuda_graphs and self._graphs_supported()
        self._graphs: dict = {}
        self._graph_states: dict = {}
        self._graph_pool = None
        self._prefill_masks: dict = {}

    def _graphs_supported(self) -> bool:
        if self.device.type != "cuda":
            warnings.warn("VARSampler: cuda_graphs=True needs a CUDA model; using the eager step", stacklevel=3)
            return False
        return True

    def kv_cache_bytes(self, B: int, scales: Optional[int] = None, prune=None, start: int = 0,
                       kv_budget=None) -> int:
        """Bytes of the KV cache for a batch of B images (2B rows with CFG), for a run over the first ``scales``
        scales (None: all of them) with the token pruning ``prune`` and the KV-cache compression ``kv_budget`` (see
        :meth:`sample`) from scale ``start`` on (a run from ``start > 0``, CoDe's refiner, writes every token of the
        scales before it): ``2 (k, v) * 2B * heads * T * head_dim * itemsize``, T the cache length of
        :class:`~varcore.models.basic_var.KVPlan`. The cache is allocated once per call, so this is also the most
        it holds."""
        check_batch(B)
        stop = self.SN if scales is None else scales
        tokens = self.written(start, stop, keep_counts(prune, self.patch_nums))
        budgets = kv_budgets(kv_budget, self.patch_nums, len(self.var.blocks))
        T = StaticKVCache.positions(len(self.var.blocks), self.patch_nums[:stop], tokens, budgets, start)
        return 2 * 2 * B * self.heads * T * self.head_dim * self.dtype.itemsize

    def memory_report(self, B: int, prune=None, kv_budget=None) -> Dict[str, float]:
        """KV-cache bytes of a call with ``prune`` and ``kv_budget`` (see :meth:`sample`) against the plain call,
        for this static cache and for the official ``torch.cat`` cache (float32, all L tokens of every block):
        ``peak_bytes`` (what the call allocates and holds at most), ``plain_bytes``, ``peak_ratio``,
        ``official_peak_bytes`` and ``official_peak_ratio`` (``peak_bytes`` over the official cache's)."""
        peak, plain, official = (self.kv_cache_bytes(B, prune=prune, kv_budget=kv_budget), self.kv_cache_bytes(B),
                                 self.concat_kv_cache_bytes(B))
        return {"peak_bytes": peak, "plain_bytes": plain, "peak_ratio": peak / plain,
                "official_peak_bytes": official, "official_peak_ratio": peak / official}

    def written(self, start: int, stop: int, keeps: Sequence[Optional[int]]) -> Optional[List[int]]:
        """The tokens each scale ``0..stop-1`` of a run from ``start`` writes to the KV cache, for the kept counts
        ``keeps`` (None per unpruned scale): None when every scale writes all its tokens."""
        if all(k is None for k in keeps[start:stop]):
            return None
        return [pn * pn if si < start or keeps[si] is None else keeps[si]
                for si, pn in enumerate(self.patch_nums[:stop])]

    def concat_kv_cache_bytes(self, B: int) -> int:
        """Bytes the official ``torch.cat`` cache holds at the end of a call (float32), for comparison."""
        check_batch(B)
        return 2 * 2 * B * len(self.var.blocks) * self.var.L * self.var.C * 4

    # ------------------------------------------------------------------------------------------ one call
    def options(self, cfg, top_k, top_p, temperature, more_smooth,
                temperature_name: str = "temperature", cfg_skip: int = 0, prune=None,
                kv_budget=None, draw: str = "multinomial") -> List[ScaleOptions]:
        """The checked options of every scale (see :func:`~varcore.sampling.draw.scale_options`); the last
        ``cfg_skip`` scales unguided, the tokens kept at each scale by ``prune`` (:func:`keep_counts`), the KV
        cache's keep ratios after each scale by ``kv_budget`` (:func:`kv_budgets`) and the ``draw`` method (see
        :meth:`sample`)."""
        cfg, top_ks, top_ps, temps = scale_options(self.SN, self.var.V, cfg, top_k, top_p, temperature, more_smooth,
                                                   temperature_name)
        if isinstance(cfg_skip, bool) or not isinstance(cfg_skip, int) or not 0 <= cfg_skip < self.SN:
            raise ValueError(f"cfg_skip must be an int in [0, {self.SN - 1}] (scales run without guidance, counted "
                             f"from the last), got {cfg_skip!r}")
        guided = [si < self.SN - cfg_skip for si in range(self.SN)]
        keeps = keep_counts(prune, self.patch_nums)
        budgets = kv_budgets(kv_budget, self.patch_nums, len(self.var.blocks))
        check_draw(draw)
        return [ScaleOptions(si, cfg * (si / (self.SN - 1)), top_ks[si], top_ps[si], temps[si], more_smooth,
                             guided=guided[si], guided_next=guided[min(si + 1, self.SN - 1)], keep=keeps[si],
                             kv_ratio=budgets[si], draw=draw)
                for si in range(self.SN)]

    def call_state(self, labels: torch.Tensor, start: int = 0, stop: Optional[int] = None,
                   keeps: Optional[Sequence[Optional[int]]] = None, budgets: Optional[Sequence] = None) -> _CallState:
        """The conditioning of the CFG batch ``[labels; null]``, computed once per call, a KV cache for scales
        ``0..stop-1`` (sized for the tokens they keep, ``keeps`` as :func:`keep_counts` gives them, and compressed
        by ``budgets`` as :func:`kv_budgets` gives them) and, for a run that starts at scale ``start > 0``, its
        prefill mask."""
        var, B, stop = self.var, labels.shape[0], self.SN if stop is None else stop
        tokens = None if keeps is None else self.written(start, stop, keeps)
        if budgets is not None and all(b is None for b in budgets[start:stop - 1]):
            budgets = None
        cond_B2D = var.class_emb(torch.cat((labels, torch.full_like(labels, var.num_classes))))
        cond_or_gss = var.shared_ada_lin(cond_B2D)
        fresh = ([block.modulations(cond_or_gss) for block in var.blocks], var.head_nm.modulations(cond_B2D),
                 var.lvl_embed(var.lvl_1L) + var.pos_1LC)
        visible_end = self._prefill_mask(start) if start else None
        key = (B, start, stop) if tokens is None else (B, start, stop, tuple(tokens))
        if budgets is not None:
            key = key + (tuple(budgets[:stop]),)
        if not self.cuda_graphs:
            return _CallState(key, cond_B2D, self._cache(B, stop, tokens, budgets, start), *fresh, visible_end)
        # graphs read fixed addresses: keep this run's buffers and copy the new values in
        state = self._graph_states.get(key)
        if state is None:
            state = self._graph_states[key] = _CallState(key, cond_B2D, self._cache(B, stop, tokens, budgets, start),
                                                         *_map_tensors(torch.clone, fresh), visible_end)
        _map_tensors(lambda dst, src: dst.copy_(src), (state.mods, state.head_mods, state.lvl_pos_1LC), fresh)
        state.cond_B2D = cond_B2D
        return state

    def _prefill_mask(self, start: int, keep: Optional[int] = None) -> BlockCausalMask:
        """The block-causal mask of a prefill over scales ``0..start`` (built once per ``start`` and ``keep``);
        with ``keep``, scale ``start`` has only its ``keep`` pivotal tokens, which close the prefix."""
        if (start, keep) not in self._prefill_masks:
            ends = code_prefill_visible_end(self.patch_nums, start).tolist()
            if keep is not None:
                begin = self.var.begin_ends[start][0]
                ends = ends[:begin] + [begin + keep] * keep
            self._prefill_masks[start, keep] = BlockCausalMask(ends)
        return self._prefill_masks[start, keep]

    def _cache(self, B: int, stop: int, tokens: Optional[List[int]] = None, budgets: Optional[Sequence] = None,
               start: int = 0) -> StaticKVCache:
        return StaticKVCache(len(self.var.blocks), 2 * B, self.heads, self.head_dim, self.patch_nums[:stop],
                             self.dtype, self.device, tokens, None if budgets is None else budgets[:stop], start)

    def first_input(self, state: _CallState, hub_BlCv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scale 0's transformer input (2B, first_l, C): class embedding + start position + lvl/pos embedding; with
        a token hub (B, P - first_l, Cvae), the next-scale inputs of scales 1..N, the prefill input of scales 0..N
        (2B, P, C)."""
        var, cond_B2D = self.var, state.cond_B2D
        B2, first_l = cond_B2D.shape[0], var.first_l
        x_BlC = (cond_B2D.unsqueeze(1).expand(B2, first_l, -1) + var.pos_start.expand(B2, first_l, -1)
                 + state.lvl_pos_1LC[:, :first_l])
        if hub_BlCv is None:
            return x_BlC
        prefix = var.word_embed(hub_BlCv.to(x_BlC.dtype)) + state.lvl_pos_1LC[:, first_l:first_l + hub_BlCv.shape[1]]
        return torch.cat((x_BlC, prefix.repeat(2, 1, 1)), dim=1)

    def embed(self, si: int, next_BlCv: torch.Tensor, state: _CallState, guided: bool = True) -> torch.Tensor:
        """The transformer input (2B, pn^2, C) of scale ``si`` from its next-scale input (B, pn^2, Cvae); the
        conditional half (B, pn^2, C) only when not ``guided``."""
        begin, end = self.var.begin_ends[si]
        x_BlC = self.var.word_embed(next_BlCv) + state.lvl_pos_1LC[:, begin:end]
        return x_BlC.repeat(2, 1, 1) if guided else x_BlC

    # ------------------------------------------------------------------------------------------ one scale
    # A scale runs as two functions with static shapes and no random ops, so that each can be compiled or captured
    # as a CUDA graph; the scale's random numbers are drawn between them (nothing else is random, so the official
    # draw order is kept) and the eager path frees the KV cache between them at the last scale.
    def forward(self, opts: ScaleOptions, x_BlC: torch.Tensor, prev_BlC: Optional[torch.Tensor],
                state: _CallState) -> torch.Tensor:
        """The blocks over one scale's tokens (2B, l, C) (the conditional half (B, l, C) of an unguided scale), or
        over the prefill's tokens of scales ``0..si``, reading and extending the KV cache (those rows of it): the
        hidden states of the scale's tokens.

        A pruned scale (``opts.keep`` set) runs only its pivotal tokens (:meth:`pivotal`) through the blocks and
        restores the others from ``prev_BlC``, the previous scale's hidden states (:meth:`restore`); a pruned
        prefill takes them from its own output at the scale before."""
        var, si, l = self.var, opts.si, self.patch_nums[opts.si] ** 2
        begin = var.begin_ends[si][0]  # the scale's first token in the schedule (and in a prefill's input)
        mask = state.visible_end if opts.prefill else None
        pos = 0 if opts.prefill else (begin if opts.cache_pos is None else opts.cache_pos)
        if opts.keep is not None:
            idx_Bk = self.pivotal(opts, x_BlC[:, -l:], state)
            kept = x_BlC[:, -l:].gather(1, idx_Bk.unsqueeze(-1).expand(-1, -1, x_BlC.shape[2]))
            if opts.prefill:  # the kept tokens close the prefix and see all of it
                x_BlC = torch.cat((x_BlC[:, :begin], kept), dim=1)
                mask = self._prefill_mask(si, opts.keep)
            else:
                x_BlC = kept
        x_BlC = self._blocks(opts, x_BlC, state, pos, mask, self._compressions(opts, state))
        if opts.keep is None:
            return x_BlC[:, -l:] if opts.prefill else x_BlC
        if opts.prefill:
            prev_BlC, x_BlC = x_BlC[:, var.begin_ends[si - 1][0]:begin], x_BlC[:, begin:]
        return self.restore(si, prev_BlC, x_BlC, idx_Bk)

    def _blocks(self, opts: ScaleOptions, x_BlC: torch.Tensor, state: _CallState, pos: int,
                mask: Optional[torch.Tensor], compress: Sequence[Optional[KVCompress]]) -> torch.Tensor:
        """Every block over the tokens ``x_BlC``, whose k/v go to the KV cache from position ``pos`` on (block j's
        from ``opts.kv_pos[j]`` under KV-cache compression, outside a prefill), block j compressing its cache
        afterwards by ``compress[j]``."""
        var = self.var
        chunks = row_chunks(*x_BlC.shape[:2], var.C, self.dtype.itemsize)
        for j, (block, w) in enumerate(zip(var.blocks, self.weights)):
            pos_j = pos if opts.kv_pos is None or opts.prefill else opts.kv_pos[j]
            if len(chunks) == 1:  # all rows (the first B, the conditional half, of an unguided scale)
                rows = slice(None) if opts.guided else slice(0, x_BlC.shape[0])
                x_BlC = block.step(x_BlC, [m[rows] for m in state.mods[j]], w, state.kv, j, pos_j, rows, mask,
                                   compress[j])
                continue
            out_BlC = torch.empty_like(x_BlC)
            for rows in chunks:
                mods = [m[rows] for m in state.mods[j]]
                out_BlC[rows] = block.step(x_BlC[rows], mods, w, state.kv, j, pos_j, rows, mask, compress[j])
            x_BlC = out_BlC
        return x_BlC

    def _compressions(self, opts: ScaleOptions, state: _CallState) -> List[Optional[KVCompress]]:
        """Each block's :class:`~varcore.models.basic_var.KVCompress` after scale ``opts.si`` (None: it keeps its
        cache): the window is the scale's grid of queries, or all its queries where it is pruned. At a staged scale
        every block has one (its keys go through the cache's scratch)."""
        depth = len(self.var.blocks)
        if opts.kv_keep is None and not opts.kv_stage and not opts.kv_measure:
            return [None] * depth
        pn = self.patch_nums[opts.si]
        queries, grid = (pn * pn, pn) if opts.keep is None else (opts.keep, None)
        stats = state.kv_stats.setdefault(opts.si, []) if opts.kv_measure else None
        keeps = opts.kv_keep or (None,) * depth
        return [KVCompress(k, queries, grid, stats, opts.kv_stage)
                if k is not None or stats is not None or opts.kv_stage else None for k in keeps]

    def pivotal(self, opts: ScaleOptions, x_BlC: torch.Tensor, state: _CallState) -> torch.Tensor:
        """The indices (rows, keep) of the ``opts.keep`` pivotal tokens of scale ``opts.si`` among its transformer
        inputs ``x_BlC`` (rows, pn^2, C), largest score first.

        The score is FastVAR's (``masked_previous_scale_cache`` in its ``fastvar_utils.py``): the squared L2
        distance of a token's feature from the mean feature of the scale's tokens (its ``(1, 1)`` average pool),
        the largest kept. The feature is the token's word embedding, the input without the level and position
        embeddings: FastVAR's backbones position their tokens with RoPE, so their block inputs carry no position
        term, and a learned position embedding would bias the choice towards fixed places. Both halves of the CFG
        batch embed the same next-scale input, so the conditional half's score picks the kept tokens of both.
        """
        begin, end = self.var.begin_ends[opts.si]
        B = x_BlC.shape[0] // 2 if opts.guided else x_BlC.shape[0]
        feat = x_BlC[:B].float() - state.lvl_pos_1LC[:, begin:end]
        score_Bl = (feat - feat.mean(dim=1, keepdim=True)).square().sum(dim=-1)
        idx_Bk = score_Bl.topk(opts.keep, dim=1).indices
        return idx_Bk.repeat(2, 1) if opts.guided else idx_Bk

    def restore(self, si: int, prev_BlC: torch.Tensor, kept_BkC: torch.Tensor, idx_Bk: torch.Tensor) -> torch.Tensor:
        """Scale ``si``'s hidden states (rows, pn^2, C): the previous scale's ``prev_BlC`` upsampled with ``area``
        interpolation (FastVAR's ``unmerge``), the blocks' outputs ``kept_BkC`` scattered in at ``idx_Bk``. An
        unguided scale after a guided one takes the conditional half of ``prev_BlC``."""
        rows, C = kept_BkC.shape[0], kept_BkC.shape[2]
        pn, pp = self.patch_nums[si], self.patch_nums[si - 1]
        prev_BChw = prev_BlC[:rows].transpose(1, 2).reshape(rows, C, pp, pp)
        out_BlC = F.interpolate(prev_BChw, size=(pn, pn), mode="area").flatten(2).transpose(1, 2).contiguous()
        return out_BlC.scatter_(1, idx_Bk.unsqueeze(-1).expand(-1, -1, C), kept_BkC.to(out_BlC.dtype))

    def _guided_logits(self, x_BlC: torch.Tensor, state: _CallState, t: float, guided: bool = True) -> torch.Tensor:
        """Float32 CFG logits (B, l, V): ``(1 + t) cond - t uncond``, or the conditional logits of the
        conditional half (B, l, C) when not ``guided``."""
        if not guided:
            head_mods = [m[:x_BlC.shape[0]] for m in state.head_mods]
            z = self.var.head_nm.modulate(x_BlC.float(), head_mods)
            return F.linear(z.to(self.head_w.dtype), self.head_w, self.head_b).float()
        z = self.var.head_nm.modulate(x_BlC.float(), state.head_mods)
        B = z.shape[0] // 2
        if self.exact:  # the official arithmetic: the head on both halves, then the mix (in place: the same values)
            V = self.head_w.shape[0]
            chunks = _batch_chunks(B, z.shape[1], 2 * V * 4)  # both halves' float32 logits per token
            if len(chunks) == 1:
                logits = F.linear(z, self.head_w, self.head_b).float()
                return guide_var(logits[:B], logits[B:], t)  # a new tensor: the (2B, l, V) one dies
            mixed_BlV = z.new_empty(B, z.shape[1], V)
            for rows in chunks:  # the same rows' values: see row_chunks
                cond = F.linear(z[:B][rows], self.head_w, self.head_b).float()
                uncond = F.linear(z[B:][rows], self.head_w, self.head_b)
                mixed_BlV[rows] = guide_var(cond, uncond, t)
            return mixed_BlV
        # the head is linear (and the mix weights sum to 1), so mix first and run it on half the rows
        z_mix = guide_var(z[:B], z[B:], t)
        return F.linear(z_mix.to(self.dtype), self.head_w, self.head_b).float()

    def draw(self, opts: ScaleOptions, x_BlC: torch.Tensor, f_hat: torch.Tensor, noise_NV: torch.Tensor,
             gumbel_BlV: Optional[torch.Tensor], state: _CallState):
        """Head, CFG, filters and the draw: returns (the next scale's transformer input, its next-scale input
        (B, pn^2, Cvae), f_hat, idx_Bl, nonfinite). The first is None at a run's last scale, the first two at the
        schedule's last; nonfinite is a 0-dim bool tensor set when a row of logits was not finite (checked once per
        call, see :func:`~varcore.sampling.draw.raise_if_nonfinite`).

        ``noise_NV`` holds the multinomial's Exp(1) draws (B*pn^2, V), or with ``opts.draw == "inverse_cdf"`` one
        uniform per token (B*pn^2, 1); ``gumbel_BlV`` those of ``more_smooth``.
        """
        var, si = self.var, opts.si
        pn = self.patch_nums[si]
        logits_BlV = self._guided_logits(x_BlC, state, opts.cfg_t, opts.guided)
        B, l, V = logits_BlV.shape
        logits_NV, idx_N = logits_BlV.view(-1, V), noise_NV.new_empty(B * l, dtype=torch.long)
        nonfinite_N = noise_NV.new_empty(B * l, dtype=torch.bool)
        # row by row (in chunks: the sort's values and int64 indices would triple the logits' memory at the big
        # scales, while the KV cache is full): filter in place, then draw
        for rows in _draw_chunks(B * l, V):
            chunk_NV = logits_NV[rows]
            top_k_top_p_filter_(chunk_NV, opts.top_k, opts.top_p, sort_top_k_only=not self.exact)
            nonfinite_N[rows] = nonfinite_rows(chunk_NV)
            probs_NV = temper(chunk_NV, opts.temperature).softmax(dim=-1)
            if opts.draw == "inverse_cdf":  # rows that are not finite are flagged above
                idx_N[rows] = inverse_cdf_index(probs_NV, noise_NV[rows]).view(-1)
            else:  # torch.multinomial(probs, 1) is argmax(probs / q) with q ~ Exp(1): the same draw, no host syncs
                idx_N[rows] = probs_NV.div_(noise_NV[rows]).argmax(dim=-1)
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
        f_hat, next_BChw = quant_ops.add_scale_(si, f_hat, h_BChw, self.phis, self.patch_nums)
        nonfinite = nonfinite_N.any()
        if si == self.SN - 1:
            return None, None, f_hat, idx_Bl, nonfinite
        next_BlCv = next_BChw.view(B, var.Cvae, -1).transpose(1, 2)
        x_next = self.embed(si + 1, next_BlCv, state, opts.guided_next) if opts.embed_next else None
        return x_next, next_BlCv, f_hat, idx_Bl, nonfinite

    def noise(self, B: int, l: int, more_smooth: bool, gens, draw: str = "multinomial"
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A scale's random numbers in the official order: the multinomial's Exp(1) draws (B*l, V) (or, with
        ``draw="inverse_cdf"``, one uniform per token, (B*l, 1)), then more_smooth's Exp(1) draws (B, l, V)."""
        V = self.var.V

        def exp(rows, gen):
            return torch.empty(rows, V, device=self.device).exponential_(generator=gen)

        def pick(rows, gen):
            return inverse_cdf_uniforms(rows, self.device, gen) if draw == "inverse_cdf" else exp(rows, gen)

        if len(gens) == 1:
            noise_NV = pick(B * l, gens[0])
            return noise_NV, exp(B * l, gens[0]).view(B, l, V) if more_smooth else None
        per_image = [(pick(l, g), exp(l, g) if more_smooth else None) for g in gens]
        gumbel = torch.stack([g for _, g in per_image]) if more_smooth else None
        return torch.cat([n for n, _ in per_image]), gumbel

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, labels: torch.Tensor, gens, opts: Sequence[ScaleOptions], what: str, start: int = 0,
            stop: Optional[int] = None, hub_BlCv: Optional[torch.Tensor] = None, f_hat: Optional[torch.Tensor] = None,
            bar=None, kv_stats: Optional[dict] = None
            ) -> Tuple[List[torch.Tensor], torch.Tensor, List[Optional[torch.Tensor]]]:
        """Scales ``start..stop-1`` of one call with the per-scale options ``opts`` (all SN of them): conditioning,
        then per scale the forward pass, its random numbers and the draw. Returns (idx_Bl per scale, f_hat, the
        next-scale inputs (B, pn^2, Cvae) drawn at each scale).

        A run from ``start > 0`` begins with the prefill of scales ``0..start`` over ``hub_BlCv`` (see
        :meth:`first_input`) and continues ``f_hat`` (modified in place); a run may stop before the last scale,
        with a KV cache sized for its scales. The cache is freed after the last forward pass (without CUDA graphs).
        Non-finite logits raise a ValueError naming ``what`` after the loop; ``bar`` (tqdm) ticks per scale.
        ``kv_stats`` (a dict) receives the window attention of each block at the scales whose options have
        ``kv_measure`` set, ``{scale: [(block, mass (rows, H, keys))]}`` (:meth:`kv_plan`).
        """
        stop = self.SN if stop is None else stop
        state = self.call_state(labels, start, stop, [o.keep for o in opts], [o.kv_ratio for o in opts])
        plan = state.kv.plan if any(o.kv_ratio is not None for o in opts[start:stop - 1]) else None
        state.kv_stats = kv_stats
        x_BlC = self.first_input(state, hub_BlCv)
        B = labels.shape[0]
        if f_hat is None:
            f_hat = x_BlC.new_zeros(B, self.var.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        idx_Bl_list, next_list = [], []
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        pos, prev_BlC = self.var.begin_ends[start][0], None  # pruned scales leave fewer k/v for the later ones
        for si in range(start, stop):
            o = replace(opts[si], prefill=si == start and start > 0, embed_next=si + 1 < stop, cache_pos=pos)
            if plan is not None:  # KV-cache compression: each block's own write position and kept keys
                o = replace(o, kv_pos=plan.pos[si], kv_keep=plan.keep[si], kv_stage=plan.staged[si])
            pos += self.patch_nums[si] ** 2 if o.keep is None else o.keep
            if not o.guided and x_BlC.shape[0] == 2 * B:  # a run's first scale: its input was built for both halves
                x_BlC = x_BlC[:B]
            x_BlC = self._run("forward", o, (x_BlC, prev_BlC), state)
            # a pruned next scale restores its other tokens from these hidden states
            prev_BlC = x_BlC if si + 1 < stop and opts[si + 1].keep is not None else None
            if si == stop - 1 and not self.cuda_graphs:
                state.kv = None  # nothing reads the cache any more: free it before the head
            noise_NV, gumbel_BlV = self.noise(B, self.patch_nums[si] ** 2, o.more_smooth, gens, o.draw)
            x_BlC, next_BlCv, f_hat, idx_Bl, bad = self._run("draw", o, (x_BlC, f_hat, noise_NV, gumbel_BlV), state)
            nonfinite = nonfinite | bad
            idx_Bl_list.append(idx_Bl)
            next_list.append(next_BlCv)
            if bar is not None:
                bar.update(1)
        raise_if_nonfinite(nonfinite, what, opts[-1].cfg_t)
        return idx_Bl_list, f_hat, next_list

    def _run(self, phase: str, opts: ScaleOptions, inputs: tuple, state: _CallState):
        """Run ``phase`` ("forward" or "draw") eagerly, compiled, or (the forward) as a CUDA graph replay; a
        calibration step (``opts.kv_measure``, which records tensors from inside the step) always eagerly."""
        if opts.kv_measure:
            return (self.forward if phase == "forward" else self.draw)(opts, *inputs, state)
        fn = self._phases[phase]
        if self.cuda_graphs and phase == "forward":
            try:
                return self._graph_call(self.graph_key(opts, state), fn, opts, inputs, state)
            except RuntimeError as err:  # capture is fragile (allocator, unsupported ops): fall back for good
                warnings.warn(f"VARSampler: CUDA graph capture failed ({err}); using the eager step", stacklevel=3)
                self.cuda_graphs, self._graphs, self._graph_states, self._graph_pool = False, {}, {}, None
        if not self._compiled:
            return fn(opts, *inputs, state)
        # one compiled graph per phase, scale and batch size: allow that many specialisations
        with torch._dynamo.config.patch(recompile_limit=max(64, 8 * self.SN)):
            return fn(opts, *inputs, state)

    @staticmethod
    def graph_key(opts: ScaleOptions, state: _CallState) -> tuple:
        """What a captured forward pass depends on: the run (batch, first and last scale: the KV cache and the
        per-call buffers), the scale, whether it is a prefill and whether it is guided, and with pruning the tokens
        it keeps and where its k/v go (with KV-cache compression each block's position, kept count and whether the
        scale is staged). Everything that changes
        only values (cfg, top-k, top-p, temperature, labels, seeds) is outside the graphs: the draw runs eagerly,
        so one set of graphs serves every sampling setting."""
        return (state.key, opts.si, opts.prefill, opts.guided, opts.keep, opts.cache_pos, opts.kv_pos, opts.kv_keep,
                opts.kv_stage)

    @staticmethod
    def rewrites_cache(opts: ScaleOptions) -> bool:
        """Whether the forward pass of ``opts`` overwrites cached keys that it reads itself, so that running it
        twice differs from running it once (a graph capture's warm-up must then be undone): a compressing or
        staged scale moves each block's kept keys, and a run's last scale writes each block's tokens over the
        regions of the blocks before it (:class:`~varcore.models.basic_var.KVPlan`)."""
        return opts.kv_keep is not None or opts.kv_stage or not opts.embed_next

    def _graph_call(self, key, fn, opts: ScaleOptions, inputs: tuple, state: _CallState):
        """Capture ``fn`` once per key (its static inputs are clones of the first call's), then replay it.

        Every graph allocates from one memory pool, so the graphs of a sampler reserve about the largest one's
        memory, not the sum. Sharing is safe because each graph's output is consumed (by the eager draw) before
        any other graph replays: a later capture may have placed its output where an earlier graph keeps its
        temporaries. The outputs stay valid until a graph of this sampler is replayed again.
        """
        entry = self._graphs.get(key)
        if entry is None:
            static_in = tuple(None if t is None else t.clone() for t in inputs)
            saved = (state.kv.k.clone(), state.kv.v.clone()) if self.rewrites_cache(opts) else None
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits), on copies: fn works in place
                fn(opts, *(None if t is None else t.clone() for t in static_in), state)
                if saved is not None:
                    state.kv.k.copy_(saved[0])
                    state.kv.v.copy_(saved[1])
            torch.cuda.current_stream().wait_stream(stream)
            del saved
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                static_out = fn(opts, *static_in, state)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        return static_out

    @contextmanager
    def eval_mode(self):
        """The VAR and the VAE in eval mode for the duration of the block, then each one's previous mode again."""
        modules = (self.var, self.vae)
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from the accumulated latent, ``decode_batch`` images at a time."""
        chunk = self.decode_batch or f_hat.shape[0]
        imgs = [self.vae.fhat_to_img(f) for f in f_hat.split(chunk)]
        return (imgs[0] if len(imgs) == 1 else torch.cat(imgs)).add_(1).mul_(0.5)

    # ------------------------------------------------------------------------------------------ public API
    @torch.no_grad()
    def sample(self, B: int, label_B: Optional[Union[int, torch.Tensor]], g_seed: Optional[int] = None,
               cfg: float = 1.5, top_k: Union[int, Sequence[int]] = 0, top_p: Union[float, Sequence[float]] = 0.0,
               more_smooth: bool = False, *, temperature: Union[float, Sequence[float]] = 1.0,
               output: str = "images", generator: Optional[torch.Generator] = None,
               per_image_seeds: bool = False, seeds: Optional[Sequence[int]] = None, cfg_skip: int = 0,
               prune=None, kv_budget=None, draw: str = "multinomial", progress: bool = False
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

        ``cfg_skip`` (an accelerator, off by default): the last ``cfg_skip`` scales run without guidance (as SkipVAR
        and StageVAR do at the late scales): their unconditional half is dropped, so their transformer and head run
        on B rows instead of 2B (half the FLOPs of those scales) and their logits are the conditional ones.

        ``prune`` (FastVAR's cached token pruning, an accelerator, off by default): a dict ``{scale index: keep
        ratio}`` or one keep ratio in (0, 1] per scale (:func:`keep_counts`); a pruned scale runs only its pivotal
        tokens through the blocks (and keeps only their k/v), the others take the previous scale's hidden states
        upsampled (:meth:`forward`); its head and draw still cover every token. Composes with ``cfg_skip``.

        ``kv_budget`` (KV-cache compression after ScaleKV, off by default): a dict ``{scale index: keep ratio}`` (or
        one entry per scale but the last, :func:`kv_budgets`), a ratio for every block or one per block
        (:meth:`kv_plan`); after such a scale each block keeps, per batch row and head, only the cached keys its
        observation window attends to most, so the later scales attend over fewer keys and the cache is allocated
        for the kept ones (:meth:`kv_cache_bytes`). Composes with ``prune`` and ``cfg_skip``.

        ``draw`` (an accelerator): ``"multinomial"`` (default) is the official draw and random stream;
        ``"inverse_cdf"`` draws each token from the same distribution by inverting its float64 CDF at one uniform
        (:func:`~varcore.sampling.draw.inverse_cdf_index`) instead of one Exp(1) number per code, other tokens for
        the same seed but far fewer random numbers (on a CPU the official draw's exponentials can cost as much as
        the transformer of a small model). Composes with every other option.
        """
        check_batch(B)
        opts = self.options(cfg, top_k, top_p, temperature, more_smooth, cfg_skip=cfg_skip, prune=prune,
                            kv_budget=kv_budget, draw=draw)
        if output not in ("images", "tokens", "both"):
            raise ValueError(f"output must be 'images', 'tokens' or 'both', got {output!r}")
        gens = generators(B, self.device, g_seed, generator, per_image_seeds, seeds)
        with self.eval_mode(), tqdm(total=self.SN, desc="VAR scales", unit="scale", disable=not progress) as bar:
            labels = class_labels(B, label_B, self.var.num_classes, self.device, gens)
            idx_Bl_list, f_hat, _ = self.run(labels, gens, opts, "the VAR sampler", bar=bar)
            if output == "tokens":
                return idx_Bl_list
            img = check_images_finite(self.decode(f_hat), "the VAR sampler")
        return img if output == "images" else (img, idx_Bl_list)

    __call__ = sample

    @torch.no_grad()
    def kv_plan(self, B: int, label_B, g_seed: Optional[int] = 0, *, ratio: float, from_scale: int,
                drafters: float = 0.25, drafter_ratio: Optional[float] = None, cfg: float = 1.5, top_k=0,
                top_p=0.0, prune=None, cfg_skip: int = 0, stats: Optional[dict] = None) -> Dict[int, Tuple[float, ...]]:
        """A ``kv_budget`` for :meth:`sample` from the attention of one calibration call of B images (uncompressed,
        with these sampling arguments): ScaleKV's drafter/refiner split at each scale from ``from_scale`` to the
        last but one, by :func:`kv_split` and :func:`kv_plan_from_attention` (see there). Returns ``{scale: (ratio
        of block 0, ..., block depth-1)}``; ``stats``, a dict, receives the dispersions ``{scale: [per block]}``.
        The calibration call reads its statistics on the host once, at its end."""
        split = kv_split(len(self.var.blocks), ratio, drafters, drafter_ratio)
        opts = self.measure_options(from_scale, cfg, top_k, top_p, prune, cfg_skip)
        check_batch(B)
        gens = generators(B, self.device, g_seed, None, False, None)
        found: dict = {}
        with self.eval_mode():
            labels = class_labels(B, label_B, self.var.num_classes, self.device, gens)
            self.run(labels, gens, opts, "the KV-cache calibration", kv_stats=found)
        return kv_plan_from_attention(found, split, stats)

    def measure_options(self, from_scale: int, cfg, top_k, top_p, prune, cfg_skip: int) -> List[ScaleOptions]:
        """The options of a calibration call (:meth:`kv_plan`): each block's window attention recorded at the
        scales from ``from_scale`` to the last but one."""
        if isinstance(from_scale, bool) or not isinstance(from_scale, int) or not 0 <= from_scale < self.SN - 1:
            raise ValueError(f"from_scale must be an int in [0, {self.SN - 2}], got {from_scale!r}")
        return [replace(o, kv_measure=from_scale <= o.si < self.SN - 1)
                for o in self.options(cfg, top_k, top_p, 1.0, False, cfg_skip=cfg_skip, prune=prune)]


def kv_split(depth: int, ratio: float, drafters: float = 0.25,
             drafter_ratio: Optional[float] = None) -> Tuple[int, int, float, float]:
    """ScaleKV's budget split of ``depth`` blocks with mean keep ratio ``ratio``: ``(depth, drafter count
    round(drafters * depth), drafter ratio, refiner ratio)``; the drafters keep ``drafter_ratio`` (default
    ``min(1, 1.5 * ratio)``, about ScaleKV's ratio between its two budgets), the refiners what makes the mean over
    blocks ``ratio``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a real number in (0, 1], got {type(ratio).__name__}")
    if not 0 < ratio <= 1:  # NaN fails this too
        raise ValueError(f"ratio must be a real number in (0, 1], got {ratio!r}")
    check_number("drafters", drafters, 0.0, 1.0)
    n_d = round(drafters * depth)
    r_d = min(1.0, 1.5 * ratio) if drafter_ratio is None else check_number("drafter_ratio", drafter_ratio, 0.0, 1.0)
    r_r = ratio if n_d in (0, depth) else (depth * ratio - n_d * r_d) / (depth - n_d)
    if n_d not in (0, depth) and not (0 < r_r <= 1 and r_d >= ratio):
        raise ValueError(f"drafter_ratio must lie in [ratio, 1] and leave the refiners a ratio in (0, 1]: got "
                         f"drafter_ratio={r_d!r} for ratio={ratio!r} and {n_d} of {depth} drafters")
    return depth, n_d, (r_d if n_d else ratio), r_r


def kv_plan_from_attention(found: dict, split: Tuple[int, int, float, float],
                           stats: Optional[dict] = None) -> Dict[int, Tuple[float, ...]]:
    """Per-block keep ratios per scale from the window attention ``found`` (``{scale: [(block, mass (rows, H,
    keys))]}``, as a calibration run records it) and the :func:`kv_split` ``split``.

    A block's *dispersion* at a scale is the entropy of its window's attention mass over the cached keys
    (:func:`~varcore.models.basic_var.window_attention_mass`, normalised to sum 1), divided by ``log(keys)`` and
    averaged over the batch rows and heads; the most dispersed blocks are the drafters. ``stats`` (a dict) receives
    the dispersions ``{scale: [per block]}``. Reads the statistics on the host."""
    depth, n_d, r_d, r_r = split
    plan = {}
    for si in sorted(found):
        per_block = [[] for _ in range(depth)]
        for j, mass_BHn in found[si]:
            p = mass_BHn / mass_BHn.sum(dim=-1, keepdim=True)
            entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1) / math.log(max(p.shape[-1], 2))
            per_block[j].append(entropy.flatten())
        dispersion = torch.stack([torch.cat(e).mean() for e in per_block]).tolist()
        if stats is not None:
            stats[si] = dispersion
        drafter_set = set(sorted(range(depth), key=lambda j: -dispersion[j])[:n_d])
        plan[si] = tuple(r_d if j in drafter_set else r_r for j in range(depth))
    return plan


@torch.no_grad()
def autoregressive_infer_cfg(var: VAR, B: int, label_B, g_seed: Optional[int] = None, cfg: float = 1.5,
                             top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                             return_idx_Bl: bool = False):
    """:meth:`VAR.autoregressive_infer_cfg <varcore.models.var.VAR.autoregressive_infer_cfg>` (the official
    arguments and results, see there): the sampler's loop in float32, drawing from ``var.rng`` reseeded with
    ``g_seed`` (or the global RNG)."""
    check_batch(B)
    sampler = VARSampler(var)
    opts = sampler.options(cfg, top_k, top_p, 1.0, more_smooth)
    with sampler.eval_mode():
        gens = [model_generator(var, g_seed, sampler.device)]
        labels = class_labels(B, label_B, var.num_classes, sampler.device, gens)
        idx_Bl_list, f_hat, _ = sampler.run(labels, gens, opts, "autoregressive_infer_cfg")
        img = check_images_finite(sampler.decode(f_hat), "autoregressive_infer_cfg")
    return (img, idx_Bl_list) if return_idx_Bl else img


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
