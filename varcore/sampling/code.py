"""``CoDeSampler``: fast collaborative decoding on :class:`~varcore.sampling.var.VARSampler`'s machinery.

The drafter and the refiner each run as a ``VARSampler`` stage (static KV cache, conditioning once per call,
sync-free draws, optional reduced precision or ``torch.compile``), with the semantics of
:func:`varcore.models.code.collaborative_infer_cfg` (float32: the same tokens for the same seed):

* **Drafter stage**: scales ``0..N-1``. Its static cache is sized for those N scales only (with VARSampler's
  overlap: ``depth * (T_N - pn_{N-1}^2) + pn_{N-1}^2`` positions for the ``T_N`` drafted tokens, 3200 instead of
  8736 for a depth-20 drafter at N=8), the next-scale inputs go straight into the token hub, and the cache is
  freed right after the last drafted forward pass, before the refiner's cache exists.
* **Refiner stage**: one prefill pass over scales ``0..N`` with the block-causal mask (the attention kernel's
  ``visible_end`` form) fills its static cache; the head runs on the scale-N tokens only (the official code runs it
  over the whole prefix and discards all but that slice); then scales ``N+1..`` as VARSampler does.
* **Random numbers**: ``rng_parity=True`` gives the official refiner's stream: its discarded draws are replayed
  (the Exp(1) numbers only, no head or filters), and skipped altogether when the generators are seeded and
  ``more_smooth`` is off, where the drafter's generators already end in that state; ``rng_parity=False``
  continues the drafter's generators (see :mod:`varcore.models.code`).

Peak KV-cache memory is therefore ``max(drafter's N-scale cache, refiner's cache)``, reported by
:meth:`CoDeSampler.memory_report` next to the drafter alone.
"""
import math
from typing import Dict, List, Optional, Sequence, Union

import torch

from varcore.models.code import CoDeResult, check_code_pair, check_draft_steps, exit_points
from varcore.models.var import VAR
from varcore.models.vqvae import VQVAE
from varcore.ops.attention import code_prefill_visible_end
from varcore.sampling.auto_dtype import resolve_dtype
from varcore.sampling.draw import check_batch, check_cfg, check_images_finite, per_scale, raise_if_nonfinite
from varcore.sampling.var import ScaleOptions, StaticKVCache, VARSampler, _DTYPES

__all__ = ["CoDeSampler"]


class _DraftStage(VARSampler):
    """The drafter: a VARSampler that stops after ``draft_steps`` scales and collects the token hub."""

    def __init__(self, var: VAR, vae: VQVAE, draft_steps: int, **kwargs):
        super().__init__(var, vae, **kwargs)
        self.draft_steps = draft_steps
        self.hub_len = exit_points(self.patch_nums)[draft_steps] - var.first_l

    def _new_cache(self, B: int) -> StaticKVCache:
        return StaticKVCache(len(self.var.blocks), 2 * B, self.heads, self.head_dim,
                             self.patch_nums[:self.draft_steps], self.dtype, self.device)

    def kv_cache_bytes(self, B: int) -> int:
        check_batch(B)
        T = StaticKVCache.positions(len(self.var.blocks), self.patch_nums[:self.draft_steps])
        return 2 * 2 * B * self.heads * T * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def _next_input(self, si: int, next_BChw: torch.Tensor, state) -> Optional[torch.Tensor]:
        B, Cvae = next_BChw.shape[:2]
        begin, end = self.var.begin_ends[si + 1]
        first_l = self.var.first_l
        state.hub[:, begin - first_l:end - first_l].copy_(next_BChw.view(B, Cvae, -1).transpose(1, 2))
        if si + 1 == self.draft_steps:  # the drafter never runs scale N: its input only goes into the hub
            return None
        return super()._next_input(si, next_BChw, state)


class _RefineStage(VARSampler):
    """The refiner: a VARSampler whose first pass is the block-causal prefill over scales ``0..draft_steps``."""

    def __init__(self, var: VAR, vae: VQVAE, draft_steps: int, **kwargs):
        super().__init__(var, vae, **kwargs)
        self.draft_steps = draft_steps
        self.prefill_len = exit_points(self.patch_nums)[draft_steps]
        self.prefill_visible_end = code_prefill_visible_end(self.patch_nums, draft_steps, device=self.device)
        prefill = self._prefill_step
        if self._compiled:
            opts = kwargs["compile"] if isinstance(kwargs.get("compile"), dict) else {}
            prefill = torch.compile(prefill, fullgraph=True, dynamic=False, **opts)
        self._phases["prefill"] = prefill

    def _attn_mask(self, begin: int, l: int) -> Optional[torch.Tensor]:
        return self.prefill_visible_end if begin == 0 and l == self.prefill_len else None

    def _prefill_step(self, opts: ScaleOptions, x_BPC: torch.Tensor, state) -> torch.Tensor:
        """The blocks over the whole prefix (2B, P, C), filling the cache; returns scale N's hidden states."""
        x_BPC = self._blocks(x_BPC, state, 0)
        return x_BPC[:, -self.patch_nums[opts.si] ** 2:]


class CoDeSampler:
    """Fast CoDe sampling: ``drafter`` draws scales ``0..N-1``, ``refiner`` the rest (N = ``draft_steps``).

    Args:
        drafter, refiner: VARs on one token space (same schedule, VQVAE vocabulary and quantiser, classes), e.g. the
            official ``drafter_N.pth`` (d30) / ``refiner_N.pth`` (d16) or any two VARs sharing a VQVAE
            (training-free CoDe). Mismatched pairs raise ValueError.
        draft_steps: N, any value in ``[1, SN - 1]``, for any scale schedule.
        vae: the VQVAE that decodes (default: the refiner's).
        dtype, compile, decode_batch: as for :class:`~varcore.sampling.var.VARSampler` (applied to both models).

    The weights are read when the sampler is built: build a new sampler after changing them.
    """

    def __init__(self, drafter: VAR, refiner: VAR, draft_steps: int, vae: Optional[VQVAE] = None, *,
                 dtype: torch.dtype = torch.float32, compile: Union[bool, dict] = False,
                 decode_batch: Optional[int] = None):
        check_code_pair(drafter, refiner)
        self.SN = len(drafter.patch_nums)
        self.draft_steps = check_draft_steps(draft_steps, self.SN)
        dtype = resolve_dtype(dtype, drafter.lvl_1L.device)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES} or 'auto', got {dtype}")
        vae = refiner.vae_proxy[0] if vae is None else vae
        kwargs = dict(dtype=dtype, compile=compile, decode_batch=decode_batch)
        self.drafter_stage = _DraftStage(drafter, vae, self.draft_steps, **kwargs)
        self.refiner_stage = _RefineStage(refiner, vae, self.draft_steps, **kwargs)
        self.drafter, self.refiner, self.vae, self.dtype = drafter, refiner, vae, dtype
        self.patch_nums = tuple(drafter.patch_nums)
        self.device = drafter.lvl_1L.device

    # ------------------------------------------------------------------------------------------ memory
    def kv_cache_bytes(self, B: int) -> Dict[str, int]:
        """KV-cache bytes for a batch of B: the drafter's (N scales), the refiner's, and the peak, which is the
        larger of the two (the drafter's cache is freed before the refiner's is allocated)."""
        d, r = self.drafter_stage.kv_cache_bytes(B), self.refiner_stage.kv_cache_bytes(B)
        return {"drafter": d, "refiner": r, "peak": max(d, r)}

    def memory_report(self, B: int) -> Dict[str, float]:
        """KV-cache bytes of CoDe against the drafter alone, for these static caches and for the official
        ``torch.cat`` caches (float32; the drafter holds its N scales' tokens, the refiner all L)."""
        ours = self.kv_cache_bytes(B)
        alone = VARSampler.kv_cache_bytes(self.drafter_stage, B)  # the same drafter sampling all scales

        def concat(var: VAR, tokens: int) -> int:
            return 2 * 2 * B * len(var.blocks) * tokens * var.C * 4

        drafted = exit_points(self.patch_nums)[self.draft_steps - 1]
        off_d, off_r = concat(self.drafter, drafted), concat(self.refiner, self.refiner.L)
        off_alone = concat(self.drafter, self.drafter.L)
        return {
            "drafter_bytes": ours["drafter"], "refiner_bytes": ours["refiner"], "peak_bytes": ours["peak"],
            "drafter_alone_bytes": alone, "peak_ratio": ours["peak"] / alone,
            "official_peak_bytes": max(off_d, off_r), "official_drafter_alone_bytes": off_alone,
            "official_peak_ratio": max(off_d, off_r) / off_alone,
        }

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, B: int, label_B: Optional[Union[int, torch.Tensor]], g_seed: Optional[int] = None,
               cfg: float = 1.5, top_k: Union[int, Sequence[int]] = 0, top_p: Union[float, Sequence[float]] = 0.0,
               more_smooth: bool = False, *, temperature: Union[float, Sequence[float]] = 1.0,
               output: str = "images", generator: Optional[torch.Generator] = None, per_image_seeds: bool = False,
               seeds: Optional[Sequence[int]] = None, rng_parity: bool = True, progress: bool = False):
        """Sample B images with CoDe; the arguments before ``*`` are the drop-in ones (as ``VARSampler.sample``).

        ``top_k``, ``top_p`` and ``temperature`` are scalars or one value per scale (CoDe's
        ``temp=[1.1] * 7 + [1.0] * 3`` is ``temperature=``). Seeding as ``VARSampler.sample``: ``g_seed``,
        ``generator``, ``per_image_seeds`` or ``seeds``. ``rng_parity`` (default True) reproduces the official
        random stream; False continues the drafter's generators instead (no replayed draws).

        ``output``: ``"images"`` (B, 3, H, W) in [0, 1]; ``"tokens"`` the SN (B, pn^2) token maps, drafter's then
        refiner's (no decode); ``"both"`` (images, tokens); ``"details"`` a :class:`~varcore.models.code.CoDeResult`.
        """
        check_batch(B)
        check_cfg(cfg)
        if not isinstance(more_smooth, bool):
            raise TypeError(f"more_smooth must be a bool, got {type(more_smooth).__name__}")
        if not isinstance(rng_parity, bool):
            raise TypeError(f"rng_parity must be a bool, got {type(rng_parity).__name__}")
        if output not in ("images", "tokens", "both", "details"):
            raise ValueError(f"output must be 'images', 'tokens', 'both' or 'details', got {output!r}")
        SN = self.SN
        V = self.drafter.V
        top_ks = per_scale("top_k", top_k, SN, int, lambda v: 0 <= v <= V, f"in [0, V={V}]")
        top_ps = per_scale("top_p", top_p, SN, float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        temps = per_scale("temperature", temperature, SN, float, lambda v: v > 0 and math.isfinite(v),
                           "> 0 and finite")
        seeding = (g_seed, generator, per_image_seeds, seeds)
        gens = self.drafter_stage._generators(B, *seeding)
        opts = [ScaleOptions(si, float(cfg) * (si / (SN - 1)), top_ks[si], top_ps[si], temps[si], more_smooth)
                for si in range(SN)]
        modules = (self.drafter, self.refiner, self.vae)
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        bar = _progress_bar(SN, progress)
        try:
            labels, draft_idx, draft_f_hat, hub = self._draft(B, label_B, gens, opts, bar)
            if rng_parity:
                gens = self._replay(B, label_B, gens, seeding, more_smooth)
            f_hat, refine_idx = self._refine(B, labels, hub, draft_f_hat.clone(), gens, opts, bar)
            tokens = draft_idx + refine_idx
            if output == "tokens":
                return tokens
            img = check_images_finite(self.refiner_stage._decode(f_hat), "CoDe")
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)
            if bar is not None:
                bar.close()
        if output == "details":
            return CoDeResult(img, draft_idx, refine_idx, draft_f_hat, hub, f_hat)
        return img if output == "images" else (img, tokens)

    __call__ = sample

    def _draft(self, B, label_B, gens, opts: List[ScaleOptions], bar):
        """Scales 0..N-1 on the drafter: (labels, tokens, f_hat, token hub)."""
        d = self.drafter_stage
        var = d.var
        labels = d._labels(B, label_B, gens)
        cond_B2D = var.class_emb(torch.cat((labels, torch.full_like(labels, var.num_classes))))
        state = d._call_state(B, cond_B2D)
        state.hub = cond_B2D.new_empty(B, d.hub_len, var.Cvae)
        x_BlC = _first_input(var, cond_B2D, state)
        f_hat = cond_B2D.new_zeros(B, var.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        idx_Bl_list, nonfinite = [], torch.zeros((), dtype=torch.bool, device=d.device)
        for si in range(self.draft_steps):
            x_BlC = d._run("forward", opts[si], B, (x_BlC,), state)
            if si == self.draft_steps - 1:
                state.kv = None  # freed before the refiner's cache is allocated
            noise_NV, gumbel_BlV = d._noise(B, self.patch_nums[si] ** 2, var.V, opts[si].more_smooth, gens)
            x_BlC, f_hat, idx_Bl, bad = d._run("draw", opts[si], B, (x_BlC, f_hat, noise_NV, gumbel_BlV), state)
            nonfinite = nonfinite | bad
            idx_Bl_list.append(idx_Bl)
            _tick(bar)
        raise_if_nonfinite(nonfinite, "CoDe's drafter", opts[-1].cfg_t)
        return labels, idx_Bl_list, f_hat, state.hub

    def _replay(self, B, label_B, gens, seeding, more_smooth):
        """The official refiner's random numbers before scale N: its generator is reseeded (or, on the global RNG
        or a caller's generator, keeps going), draws labels again when they were drawn, and replays one draw per
        drafted scale (Exp(1) numbers of the probabilities' shape). Returns the refiner's generators.

        With seeded generators and no ``more_smooth`` the drafter has drawn exactly those numbers from the same
        seeds, so its generators already stand where the replay would leave fresh ones: they are returned as they
        are and nothing is drawn (the drop-in replays literally; the tests compare the two)."""
        g_seed, generator, per_image_seeds, seeds = seeding
        r = self.refiner_stage
        seeded = g_seed is not None or seeds is not None
        if seeded and not more_smooth:
            return gens
        if seeded:
            gens = r._generators(B, *seeding)
        if label_B is None:
            r._labels(B, None, gens)  # discarded: with one seed these are the drafter's labels
        for pn in self.patch_nums[:self.draft_steps]:
            r._noise(B, pn * pn, r.var.V, False, gens)
        return gens

    def _refine(self, B, labels, hub, f_hat, gens, opts: List[ScaleOptions], bar):
        """The prefill and scales N..SN-1 on the refiner: (f_hat, tokens)."""
        r = self.refiner_stage
        var = r.var
        N, SN = self.draft_steps, self.SN
        cond_B2D = var.class_emb(torch.cat((labels, torch.full_like(labels, var.num_classes))))
        state = r._call_state(B, cond_B2D)
        prefix = var.word_embed(hub) + state.lvl_pos_1LC[:, var.first_l:r.prefill_len]
        x_BlC = torch.cat((_first_input(var, cond_B2D, state), prefix.repeat(2, 1, 1)), dim=1)
        del prefix
        idx_Bl_list, nonfinite = [], torch.zeros((), dtype=torch.bool, device=r.device)
        for si in range(N, SN):
            x_BlC = r._run("prefill" if si == N else "forward", opts[si], B, (x_BlC,), state)
            if si == SN - 1:
                state.kv = None  # nothing reads the cache any more: free it before the head
            noise_NV, gumbel_BlV = r._noise(B, self.patch_nums[si] ** 2, var.V, opts[si].more_smooth, gens)
            x_BlC, f_hat, idx_Bl, bad = r._run("draw", opts[si], B, (x_BlC, f_hat, noise_NV, gumbel_BlV), state)
            nonfinite = nonfinite | bad
            idx_Bl_list.append(idx_Bl)
            _tick(bar)
        raise_if_nonfinite(nonfinite, "CoDe's refiner", opts[-1].cfg_t)
        return f_hat, idx_Bl_list


def _first_input(var: VAR, cond_B2D: torch.Tensor, state) -> torch.Tensor:
    """Scale 0's input (2B, first_l, C): class embedding + start position + level/position embedding."""
    B2, first_l = cond_B2D.shape[0], var.first_l
    return (cond_B2D.unsqueeze(1).expand(B2, first_l, -1) + var.pos_start.expand(B2, first_l, -1)
            + state.lvl_pos_1LC[:, :first_l])


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="CoDe scales", unit="scale")


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)
