"""CoDe (collaborative decoding) on the VAR loop: a large VAR *drafter* generates the first N scales, a small VAR
*refiner* the rest. The drop-in functions (:func:`collaborative_infer_cfg`, :func:`draft`, :func:`refine`, behind
the official ``autoregressive_infer_cfg_draft`` / ``_refine``) and :class:`CoDeSampler` run the same two stages,
each a :meth:`~varcore.sampling.var.VARSampler.run` of one model's sampler.

Official semantics (czg1225/CoDe ``autoregressive_infer_cfg_draft`` / ``_refine``; spec ``code_par_llamagen.md``
part A.3), float32 CPU parity checked against the golden ``code-small`` data:

* The drafter runs the VAR loop for scales ``0..N-1`` and hands over its accumulated ``f_hat`` and the *token hub*:
  the raw ``Cvae``-channel next-scale inputs of scales ``1..N`` (before word embedding), one
  ``(B, exit_points[N] - first_l, Cvae)`` tensor. No KV cache and no token index crosses over. Its static cache is
  sized for its N scales (``depth * (T_N - pn_{N-1}^2) + pn_{N-1}^2`` positions for the ``T_N`` drafted tokens,
  3200 instead of 8736 for a depth-20 drafter at N=8) and freed after its last forward pass, before the refiner's
  exists: peak KV-cache memory is ``max(drafter's N-scale cache, refiner's cache)``
  (:meth:`CoDeSampler.memory_report`).
* The refiner embeds that prefix with its own ``class_emb``/``pos_start``/``word_embed``/``lvl_pos`` and runs it in
  one prefill pass with the block-causal mask ("query i sees keys ``[0, visible_end(i))``", the attention kernel's
  form), which fills its KV cache for scales ``0..N``; the head runs on the scale-N tokens only (the official code
  runs it over the whole prefix and keeps that slice); guidance ``t = cfg * N / (SN-1)`` is applied to them. It then
  decodes scales ``N+1..SN-1`` as VAR does and decodes the image.
* Sampling per scale: top-k then top-p on the untempered logits (in place), then the logits are divided by the
  temperature, softmax, one multinomial draw. ``top_k`` and ``temp`` may be one value per scale.

Random numbers. The official refiner re-seeds its own generator with ``g_seed`` and, inside the prefill step,
*replays* one draw for every drafted scale (on its own unguided logits, results discarded) before drawing scale N,
so its stream is where single-model VAR's would be (the reason CoDe's maintainer gives). With
``rng_parity=True`` (default) we replay the draws as well, but only their random numbers (``torch.multinomial``
with one sample is ``argmax(p / q)``, ``q ~ Exp(1)`` over the probabilities' shape, so the numbers consumed do not
depend on the logits): the head, the filters and the softmax over the prefix are skipped. With ``rng_parity=False``
(the fast mode) nothing is replayed and the refiner simply continues the drafter's generator. The two modes give
the same tokens whenever ``g_seed`` is set and ``more_smooth`` is off (the drafter consumed exactly what the replay
would; :class:`CoDeSampler` then skips the replay); they differ with ``more_smooth`` (the drafter's Gumbel draws are
not replayed officially) and with the global RNG (``g_seed=None``: the official refiner draws again from the already
advanced global stream).

One deliberate difference: with ``label_B=None`` and ``g_seed=None`` the official refiner draws *new* labels from
the global RNG, so drafter and refiner condition on different classes. We replay that draw in parity mode (the
stream stays official) but keep the drafter's labels.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from varcore.models.code import CoDeResult, check_code_pair, check_draft_steps, exit_points
from varcore.models.var import VAR
from varcore.models.vqvae import VQVAE
from varcore.sampling.draw import check_batch, check_bool, check_images_finite, class_labels
from varcore.sampling.rng import generators, model_generator
from varcore.sampling.var import ScaleOptions, VARSampler, kv_budgets, kv_plan_from_attention, kv_split

__all__ = ["CoDeSampler", "collaborative_infer_cfg", "draft", "refine", "draft_stage", "refine_stage",
           "replay_draws"]


# ---------------------------------------------------------------------------------------------- the two stages
def draft_stage(sampler: VARSampler, labels: torch.Tensor, gens, opts: List[ScaleOptions], N: int, bar=None,
                kv_stats: Optional[dict] = None):
    """The drafter's half on its sampler: scales ``0..N-1``. Returns (tokens per scale, f_hat, token hub).
    ``kv_stats`` as for :meth:`~varcore.sampling.var.VARSampler.run`."""
    idx_Bl_list, f_hat, next_list = sampler.run(labels, gens, opts, "CoDe's drafter", stop=N, bar=bar,
                                                kv_stats=kv_stats)
    return idx_Bl_list, f_hat, torch.cat(next_list, dim=1)


def refine_stage(sampler: VARSampler, labels: torch.Tensor, hub: torch.Tensor, f_hat: torch.Tensor, gens,
                 opts: List[ScaleOptions], N: int, bar=None, kv_stats: Optional[dict] = None):
    """The refiner's half on its sampler: the prefill of scales ``0..N`` over the token ``hub``, then scales
    ``N+1..``; ``f_hat`` (the drafter's) is continued in place. Returns (tokens of scales ``N..SN-1``, f_hat).
    ``kv_stats`` as for :meth:`~varcore.sampling.var.VARSampler.run`."""
    idx_Bl_list, f_hat, _ = sampler.run(labels, gens, opts, "CoDe's refiner", start=N, hub_BlCv=hub, f_hat=f_hat,
                                        bar=bar, kv_stats=kv_stats)
    return idx_Bl_list, f_hat


def replay_draws(sampler: VARSampler, B: int, N: int, gens, relabel: bool = False,
                 draw: str = "multinomial") -> None:
    """Consume the random numbers of the official refiner's discarded draws before scale N: its label draw again
    (``relabel``, where the labels were drawn) and one draw per drafted scale, the Exp(1) numbers of the
    probabilities' shape (B * pn^2, V) that ``torch.multinomial`` with one sample draws (with
    ``draw="inverse_cdf"`` the B * pn^2 uniforms of that draw)."""
    if relabel:
        class_labels(B, None, sampler.var.num_classes, sampler.device, gens)
    for pn in sampler.patch_nums[:N]:
        sampler.noise(B, pn * pn, False, gens, draw)


def _options(sampler: VARSampler, cfg, top_k, top_p, more_smooth, temp) -> List[ScaleOptions]:
    return sampler.options(cfg, top_k, top_p, 1.0 if temp is None else temp, more_smooth, "temp")


# ---------------------------------------------------------------------------------------------- drop-in
@torch.no_grad()
def draft(drafter: VAR, B: int, label_B, draft_steps: int, g_seed: Optional[int] = None, cfg: float = 1.5,
          top_k=0, top_p: float = 0.0, more_smooth: bool = False, temp=1.0, *, rng=None):
    """The drafter's half (official ``autoregressive_infer_cfg_draft``): scales ``0..N-1``.

    Returns ``(f_hat, token_hub, idx_Bl, label_B, rng)``: the accumulated (B, Cvae, H, W) latent, the
    (B, exit_points[N] - first_l, Cvae) next-scale inputs of scales 1..N, the drawn tokens per scale, the labels
    used and the generator used (``drafter.rng`` reseeded with ``g_seed``, the given ``rng``, or None = global).
    """
    check_batch(B)
    sampler = VARSampler(drafter)
    N = check_draft_steps(draft_steps, sampler.SN)
    opts = _options(sampler, cfg, top_k, top_p, more_smooth, temp)
    with sampler.eval_mode():
        gens = [model_generator(drafter, g_seed, sampler.device) if rng is None else rng]
        labels = class_labels(B, label_B, drafter.num_classes, sampler.device, gens)
        idx_Bl_list, f_hat, hub = draft_stage(sampler, labels, gens, opts, N)
    return f_hat, hub, idx_Bl_list, labels, gens[0]


@torch.no_grad()
def refine(refiner: VAR, B: int, label_B, token_hub: torch.Tensor, f_hat: torch.Tensor, draft_steps: int,
           g_seed: Optional[int] = None, cfg: float = 1.5, top_k=0, top_p: float = 0.0, more_smooth: bool = False,
           temp=1.0, *, rng_parity: bool = True, rng=None):
    """The refiner's half (official ``autoregressive_infer_cfg_refine``): one block-causal prefill over scales
    ``0..N`` (the drafted ones from ``token_hub``), then scales ``N+1..SN-1``.

    ``rng_parity=True`` reseeds the refiner's generator with ``g_seed`` (or keeps drawing from ``rng`` / the global
    RNG) and replays the drafted scales' draws; ``rng_parity=False`` draws from ``rng`` as it is (pass the
    drafter's generator to continue its stream). ``label_B`` should be the labels the drafter used; None draws them
    from the generator (the same ones when both use one seed). Returns ``(images in [0, 1], f_hat, idx_Bl of scales
    N..SN-1)``; ``f_hat`` is not modified.
    """
    check_batch(B)
    sampler = VARSampler(refiner)
    N = check_draft_steps(draft_steps, sampler.SN)
    opts = _options(sampler, cfg, top_k, top_p, more_smooth, temp)
    hub_shape = (B, exit_points(sampler.patch_nums)[N] - refiner.first_l, refiner.Cvae)
    if not isinstance(token_hub, torch.Tensor) or tuple(token_hub.shape) != hub_shape:
        raise ValueError(f"token_hub must be a tensor of shape {hub_shape} for draft_steps={N}, "
                         f"got {tuple(getattr(token_hub, 'shape', ()))}")
    fhat_shape = (B, refiner.Cvae, refiner.patch_nums[-1], refiner.patch_nums[-1])
    if not isinstance(f_hat, torch.Tensor) or tuple(f_hat.shape) != fhat_shape:
        raise ValueError(f"f_hat must be a tensor of shape {fhat_shape}, got {tuple(getattr(f_hat, 'shape', ()))}")
    check_bool(rng_parity, "rng_parity")
    with sampler.eval_mode():
        gens = [model_generator(refiner, g_seed, sampler.device) if rng_parity and g_seed is not None else rng]
        labels = class_labels(B, label_B, refiner.num_classes, sampler.device, gens)  # None: drawn, as official
        if rng_parity:
            replay_draws(sampler, B, N, gens)
        idx_Bl_list, f_hat = refine_stage(sampler, labels, token_hub, f_hat.clone(), gens, opts, N)
        img = check_images_finite(sampler.decode(f_hat), "collaborative_infer_cfg")
    return img, f_hat, idx_Bl_list


@torch.no_grad()
def collaborative_infer_cfg(
    drafter: VAR, refiner: VAR, B: int, label_B: Optional[Union[int, torch.LongTensor]], draft_steps: int,
    g_seed: Optional[int] = None, cfg: float = 1.5, top_k: Union[int, Sequence[int]] = 0, top_p: float = 0.0,
    more_smooth: bool = False, temp: Union[float, Sequence[float]] = 1.0, *, rng_parity: bool = True,
    return_details: bool = False,
) -> Union[torch.Tensor, CoDeResult]:
    """Sample B images in [0, 1] with CoDe: ``drafter`` draws scales ``0..N-1`` (N = ``draft_steps``, any value in
    ``[1, SN-1]`` and any scale schedule), ``refiner`` draws scales ``N..SN-1`` and decodes.

    Arguments as the official scripts pass them: ``label_B`` a (B,) LongTensor, an int (negative = null class) or
    None (drawn); ``g_seed`` seeds both models' generators (None = global RNG); guidance ``t = cfg * si / (SN - 1)``;
    ``top_k`` and ``temp`` scalars or one value per scale (CoDe uses ``[1.1] * 7 + [1.0] * 3``), ``top_p`` a
    scalar; the temperature divides the logits after top-k/top-p. ``rng_parity`` selects the official replay of
    the refiner's random draws (True) or the fast continuation of the drafter's stream (False); see the module
    docstring. ``return_details=True`` returns a :class:`CoDeResult` with both halves' tokens and latents.
    """
    check_code_pair(drafter, refiner)
    check_batch(B)
    d, r = VARSampler(drafter), VARSampler(refiner)
    N = check_draft_steps(draft_steps, d.SN)
    opts = _options(d, cfg, top_k, top_p, more_smooth, temp)
    check_bool(rng_parity, "rng_parity")
    with d.eval_mode(), r.eval_mode():
        gens = [model_generator(drafter, g_seed, d.device)]
        labels = class_labels(B, label_B, drafter.num_classes, d.device, gens)
        draft_idx, draft_f_hat, hub = draft_stage(d, labels, gens, opts, N)
        if rng_parity:  # the official refiner's stream: its own generator reseeded (or the global one, going on)
            gens = gens if g_seed is None else [model_generator(refiner, g_seed, r.device)]
            replay_draws(r, B, N, gens, relabel=label_B is None)
        refine_idx, f_hat = refine_stage(r, labels, hub, draft_f_hat.clone(), gens, opts, N)
        img = check_images_finite(r.decode(f_hat), "collaborative_infer_cfg")
    return CoDeResult(img, draft_idx, refine_idx, draft_f_hat, hub, f_hat) if return_details else img


# ---------------------------------------------------------------------------------------------- the fast sampler
class CoDeSampler:
    """Fast CoDe sampling: ``drafter`` draws scales ``0..N-1``, ``refiner`` the rest (N = ``draft_steps``), each on
    its own :class:`~varcore.sampling.var.VARSampler` (``drafter_stage``, ``refiner_stage``).

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
        vae = refiner.vae_proxy[0] if vae is None else vae
        kwargs = dict(dtype=dtype, compile=compile, decode_batch=decode_batch)
        self.drafter_stage = VARSampler(drafter, vae, **kwargs)
        self.refiner_stage = VARSampler(refiner, vae, **kwargs)
        self.drafter, self.refiner, self.vae, self.dtype = drafter, refiner, vae, self.drafter_stage.dtype
        self.patch_nums = tuple(drafter.patch_nums)
        self.device = drafter.lvl_1L.device

    # ------------------------------------------------------------------------------------------ memory
    def kv_cache_bytes(self, B: int, prune=None, kv_budget=None) -> Dict[str, int]:
        """KV-cache bytes for a batch of B: the drafter's (N scales), the refiner's, and the peak, which is the
        larger of the two (the drafter's cache is freed before the refiner's is allocated); with the token pruning
        ``prune`` and the KV-cache compression ``kv_budget`` of :meth:`sample` (the refiner's prefill writes every
        drafted token; the budgets of the scales before N apply to the drafter only)."""
        N = self.draft_steps
        d_budget, r_budget = self._budgets(kv_budget)
        d = self.drafter_stage.kv_cache_bytes(B, N, prune, kv_budget=d_budget)
        r = self.refiner_stage.kv_cache_bytes(B, prune=prune, start=N, kv_budget=r_budget)
        return {"drafter": d, "refiner": r, "peak": max(d, r)}

    def _budgets(self, kv_budget):
        """``kv_budget`` for each stage: per-block ratios are the drafter's at its scales and the refiner's at
        the others, whose depths may differ (one ratio for every block applies to both)."""
        if kv_budget is None:
            return None, None
        if not isinstance(kv_budget, dict) and not (isinstance(kv_budget, (list, tuple))
                                                    and len(kv_budget) in (0, self.SN - 1)):
            kv_budgets(kv_budget, self.patch_nums, len(self.drafter.blocks))  # raises the ValueError
        kv_budget = kv_budget if isinstance(kv_budget, dict) else dict(enumerate(kv_budget))
        N = self.draft_steps
        return ({si: r for si, r in kv_budget.items() if not isinstance(si, int) or si < N},
                {si: r for si, r in kv_budget.items() if not isinstance(si, int) or si >= N})

    def memory_report(self, B: int, prune=None, kv_budget=None) -> Dict[str, float]:
        """KV-cache bytes of CoDe (with ``prune`` and ``kv_budget`` as for :meth:`sample`) against the drafter
        alone (plain), for these static caches and for the official ``torch.cat`` caches (float32; the drafter
        holds its N scales' tokens, the refiner all L)."""
        ours = self.kv_cache_bytes(B, prune, kv_budget)
        alone = self.drafter_stage.kv_cache_bytes(B)  # the same drafter sampling all scales

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

    @torch.no_grad()
    def kv_plan(self, B: int, label_B, g_seed: Optional[int] = 0, *, ratio: float, from_scale: int,
                drafters: float = 0.25, drafter_ratio: Optional[float] = None, cfg: float = 1.5, top_k=0,
                top_p=0.0, prune=None, cfg_skip: int = 0, stats: Optional[dict] = None) -> Dict[int, tuple]:
        """A ``kv_budget`` for :meth:`sample` from one uncompressed CoDe calibration call of B images, as
        ``VARSampler.kv_plan``: the drafter's blocks split at its scales from ``from_scale`` to N-2 (its last
        scale's cache is freed), the refiner's at its scales from ``max(from_scale, N)`` to the last but one, its
        prefill (scale N) included. ``stats`` receives the dispersions ``{scale: [per block]}``."""
        d, r, N = self.drafter_stage, self.refiner_stage, self.draft_steps
        splits = (kv_split(len(self.drafter.blocks), ratio, drafters, drafter_ratio),
                  kv_split(len(self.refiner.blocks), ratio, drafters, drafter_ratio))
        d_opts = d.measure_options(from_scale, cfg, top_k, top_p, prune, cfg_skip)
        r_opts = r.measure_options(from_scale, cfg, top_k, top_p, prune, cfg_skip)
        check_batch(B)
        gens = generators(B, self.device, g_seed, None, False, None)
        found_d, found_r = {}, {}
        with d.eval_mode(), r.eval_mode():
            labels = class_labels(B, label_B, self.drafter.num_classes, self.device, gens)
            _, f_hat, hub = draft_stage(d, labels, gens, d_opts, N, kv_stats=found_d)
            refine_stage(r, labels, hub, f_hat, gens, r_opts, N, kv_stats=found_r)
        plan = kv_plan_from_attention({si: m for si, m in found_d.items() if si < N - 1}, splits[0], stats)
        plan.update(kv_plan_from_attention({si: m for si, m in found_r.items() if si >= N}, splits[1], stats))
        return plan

    # ------------------------------------------------------------------------------------------ sampling
    def options(self, cfg=1.5, top_k=0, top_p=0.0, temperature=1.0, more_smooth: bool = False, *, cfg_skip: int = 0,
                prune=None, kv_budget=None, draw: str = "multinomial"
                ) -> Tuple[List[ScaleOptions], List[ScaleOptions]]:
        """The checked per-scale options of a call (the arguments of :meth:`sample`) for the drafter and for the
        refiner, each stage with its own KV budgets; ValueError or TypeError for a bad value, before any work."""
        d_budget, r_budget = self._budgets(kv_budget)
        kw = dict(cfg_skip=cfg_skip, prune=prune, draw=draw)
        return (self.drafter_stage.options(cfg, top_k, top_p, temperature, more_smooth, kv_budget=d_budget, **kw),
                self.refiner_stage.options(cfg, top_k, top_p, temperature, more_smooth, kv_budget=r_budget, **kw))

    @torch.no_grad()
    def sample(self, B: int, label_B: Optional[Union[int, torch.Tensor]], g_seed: Optional[int] = None,
               cfg: float = 1.5, top_k: Union[int, Sequence[int]] = 0, top_p: Union[float, Sequence[float]] = 0.0,
               more_smooth: bool = False, *, temperature: Union[float, Sequence[float]] = 1.0,
               output: str = "images", generator: Optional[torch.Generator] = None, per_image_seeds: bool = False,
               seeds: Optional[Sequence[int]] = None, rng_parity: bool = True, cfg_skip: int = 0,
               prune=None, kv_budget=None, draw: str = "multinomial", progress: bool = False):
        """Sample B images with CoDe; the arguments before ``*`` are the drop-in ones (as ``VARSampler.sample``).

        ``top_k``, ``top_p`` and ``temperature`` are scalars or one value per scale (CoDe's
        ``temp=[1.1] * 7 + [1.0] * 3`` is ``temperature=``). Seeding as ``VARSampler.sample``: ``g_seed``,
        ``generator``, ``per_image_seeds`` or ``seeds``. ``rng_parity`` (default True) reproduces the official
        random stream; False continues the drafter's generators instead (no replayed draws). ``cfg_skip``: the
        last ``cfg_skip`` scales without guidance (see ``VARSampler.sample``), whichever model draws them.
        ``prune``: FastVAR's token pruning per scale (see ``VARSampler.sample``), whichever model draws the scale;
        pruning the refiner's first scale prunes it inside the prefill. ``kv_budget``: KV-cache compression after
        each scale (see ``VARSampler.sample``) in the model that draws it: a budget at scale N compresses the
        refiner's prefill cache; per-block ratios name the blocks of that model (``VARSampler.kv_plan`` of each).
        ``draw``: ``"multinomial"`` (the official draw) or ``"inverse_cdf"`` (the same distribution from one uniform
        per token, see ``VARSampler.sample``) in both models.

        ``output``: ``"images"`` (B, 3, H, W) in [0, 1]; ``"tokens"`` the SN (B, pn^2) token maps, drafter's then
        refiner's (no decode); ``"both"`` (images, tokens); ``"details"`` a :class:`~varcore.models.code.CoDeResult`.
        """
        check_batch(B)
        opts, r_opts = self.options(cfg, top_k, top_p, temperature, more_smooth, cfg_skip=cfg_skip, prune=prune,
                                    kv_budget=kv_budget, draw=draw)
        check_bool(rng_parity, "rng_parity")
        if output not in ("images", "tokens", "both", "details"):
            raise ValueError(f"output must be 'images', 'tokens', 'both' or 'details', got {output!r}")
        seeding = (g_seed, generator, per_image_seeds, seeds)
        gens = generators(B, self.device, *seeding)
        N, seeded = self.draft_steps, g_seed is not None or seeds is not None
        bar = tqdm(total=self.SN, desc="CoDe scales", unit="scale", disable=not progress)
        with self.drafter_stage.eval_mode(), self.refiner_stage.eval_mode(), bar:
            labels = class_labels(B, label_B, self.drafter.num_classes, self.device, gens)
            draft_idx, draft_f_hat, hub = draft_stage(self.drafter_stage, labels, gens, opts, N, bar)
            # the official refiner's stream; with seeds and no more_smooth the drafter's generators stand where the
            # replay would leave fresh ones, so nothing is drawn (the drop-in replays literally; the tests compare)
            if rng_parity and (more_smooth or not seeded):
                gens = generators(B, self.device, *seeding) if seeded else gens
                replay_draws(self.refiner_stage, B, N, gens, relabel=label_B is None, draw=draw)
            refine_idx, f_hat = refine_stage(self.refiner_stage, labels, hub, draft_f_hat.clone(), gens, r_opts, N,
                                             bar)
            tokens = draft_idx + refine_idx
            if output == "tokens":
                return tokens
            img = check_images_finite(self.refiner_stage.decode(f_hat), "CoDe")
        if output == "details":
            return CoDeResult(img, draft_idx, refine_idx, draft_f_hat, hub, f_hat)
        return img if output == "images" else (img, tokens)

    __call__ = sample
