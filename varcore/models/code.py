"""CoDe (collaborative decoding): a large VAR *drafter* generates the first N scales, a small VAR *refiner* the rest.

Official semantics (czg1225/CoDe ``autoregressive_infer_cfg_draft`` / ``_refine``; spec ``code_par_llamagen.md``
part A.3), float32 CPU parity checked against the golden ``code-small`` data:

* The drafter runs the VAR loop with its KV cache for scales ``0..N-1`` and hands over its accumulated ``f_hat``
  and the *token hub*: the raw ``Cvae``-channel next-scale inputs of scales ``1..N`` (before word embedding), one
  ``(B, exit_points[N] - first_l, Cvae)`` tensor. No KV cache and no token index crosses over.
* The refiner embeds that prefix with its own ``class_emb``/``pos_start``/``word_embed``/``lvl_pos`` and runs it in
  one prefill pass with the block-causal mask ("query i sees keys ``[0, visible_end(i))``", the attention kernel's
  form), which fills its KV cache for scales ``0..N`` and gives the scale-N logits; guidance ``t = cfg * N / (SN-1)``
  is applied to that slice only. It then decodes scales ``N+1..SN-1`` as VAR does and decodes the image.
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
would); they differ with ``more_smooth`` (the drafter's Gumbel draws are not replayed officially) and with the
global RNG (``g_seed=None``: the official refiner draws again from the already advanced global stream).

One deliberate difference: with ``label_B=None`` and ``g_seed=None`` the official refiner draws *new* labels from
the global RNG, so drafter and refiner condition on different classes. We replay that draw in parity mode (the
stream stays official) but keep the drafter's labels.
"""
import math
from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from varcore.ops.attention import code_prefill_visible_end
from varcore.sampling.draw import (check_cfg, check_images_finite, gumbel_softmax_with_rng, nonfinite_rows,
                                      per_scale, raise_if_nonfinite, temper, top_k_top_p_filter_)

from .var import VAR, _check_pos_int, _eval_mode

__all__ = ["collaborative_infer_cfg", "draft", "refine", "check_code_pair", "check_draft_steps", "exit_points",
           "CoDeResult"]


class CoDeResult(NamedTuple):
    """Everything a collaborative call produced (``return_details=True``)."""

    images: torch.Tensor            # (B, 3, H, W) in [0, 1]
    draft_idx_Bl: List[torch.Tensor]   # tokens the drafter drew, scales 0..N-1
    refine_idx_Bl: List[torch.Tensor]  # tokens the refiner drew and used, scales N..SN-1
    draft_f_hat: torch.Tensor       # f_hat after the drafter's N scales
    token_hub: torch.Tensor         # (B, exit_points[N] - first_l, Cvae): the drafter's next-scale inputs
    f_hat: torch.Tensor             # f_hat after all scales


# ---------------------------------------------------------------------------------------------- checks
def exit_points(patch_nums: Sequence[int]) -> List[int]:
    """Cumulative token counts: ``exit_points[k]`` tokens make up scales ``0..k`` (1, 5, ..., 680 at 256 px)."""
    points, total = [], 0
    for pn in patch_nums:
        total += pn * pn
        points.append(total)
    return points


def check_draft_steps(draft_steps, num_scales: int) -> int:
    """``draft_steps`` = N must be an int in ``[1, num_scales - 1]`` (the refiner decodes at least one scale)."""
    if isinstance(draft_steps, bool) or not isinstance(draft_steps, int):
        raise TypeError(f"draft_steps must be an int, got {type(draft_steps).__name__}")
    if not 1 <= draft_steps <= num_scales - 1:
        raise ValueError(f"draft_steps must be in [1, {num_scales - 1}] for {num_scales} scales, got {draft_steps}")
    return draft_steps


def check_code_pair(drafter: VAR, refiner: VAR) -> None:
    """Refuse pairs that cannot collaborate: both must be VARs on one token space (the same scale schedule, VQVAE
    vocabulary, latent channels and quantiser weights) and the same classes. Raises TypeError/ValueError."""
    for name, model in (("drafter", drafter), ("refiner", refiner)):
        if not isinstance(model, VAR):
            raise TypeError(f"{name} must be a varcore VAR, got {type(model).__name__}")
    problems = []
    if tuple(drafter.patch_nums) != tuple(refiner.patch_nums):
        problems.append(f"scale schedules differ: drafter {tuple(drafter.patch_nums)}, "
                        f"refiner {tuple(refiner.patch_nums)}")
    if drafter.V != refiner.V:
        problems.append(f"VQVAE vocabularies differ: drafter V={drafter.V}, refiner V={refiner.V}")
    if drafter.Cvae != refiner.Cvae:
        problems.append(f"VQVAE latent channels differ: drafter Cvae={drafter.Cvae}, refiner Cvae={refiner.Cvae}")
    if drafter.num_classes != refiner.num_classes:
        problems.append(f"class counts differ: drafter {drafter.num_classes}, refiner {refiner.num_classes}")
    if drafter.lvl_1L.device != refiner.lvl_1L.device:
        problems.append(f"devices differ: drafter on {drafter.lvl_1L.device}, refiner on {refiner.lvl_1L.device}")
    if not problems:
        dq, rq = drafter.vae_quant_proxy[0], refiner.vae_quant_proxy[0]
        if dq is not rq:  # two VQVAE objects: their quantisers (codebook and phis) must hold the same weights
            d_state, r_state = dq.state_dict(), rq.state_dict()
            differing = sorted(k for k in d_state.keys() | r_state.keys()
                               if k not in d_state or k not in r_state or d_state[k].is_meta or r_state[k].is_meta
                               or not torch.equal(d_state[k], r_state[k].to(d_state[k].device)))
            if differing:
                problems.append(f"the two VQVAEs' quantisers differ ({', '.join(differing)}): "
                                f"drafter and refiner must share one VQVAE")
    if problems:
        raise ValueError("drafter and refiner cannot collaborate: " + "; ".join(problems))


def _sampling_options(num_scales: int, cfg, top_k, top_p, temp, more_smooth, V: Optional[int] = None):
    check_cfg(cfg)
    if not isinstance(more_smooth, bool):
        raise TypeError(f"more_smooth must be a bool, got {type(more_smooth).__name__}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a float, got {type(top_p).__name__}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    top_ks = per_scale("top_k", top_k, num_scales, int, lambda v: v >= 0 and (V is None or v <= V),
                        ">= 0" if V is None else f"in [0, V={V}]")
    temps = per_scale("temp", 1.0 if temp is None else temp, num_scales, float,
                       lambda v: v > 0 and math.isfinite(v), "> 0 and finite")
    return float(cfg), top_ks, float(top_p), temps


# ---------------------------------------------------------------------------------------------- one draw
def _draw(logits_BlV: torch.Tensor, rng, top_k: int, top_p: float, temp: float) -> torch.Tensor:
    """CoDe's draw: filter ``logits_BlV`` in place (untempered), divide by ``temp``, softmax, one multinomial."""
    B, l, V = logits_BlV.shape
    top_k_top_p_filter_(logits_BlV, top_k=top_k, top_p=top_p)
    raise_if_nonfinite(nonfinite_rows(logits_BlV), "CoDe's draw")
    probs_NV = temper(logits_BlV, temp).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs_NV, num_samples=1, replacement=True, generator=rng).view(B, l)


def _code_map(model: VAR, logits_BlV: torch.Tensor, idx_Bl: torch.Tensor, si: int, pn: int, more_smooth: bool,
              rng) -> torch.Tensor:
    """The (B, Cvae, pn, pn) code map of scale ``si``: the drawn codes, or with ``more_smooth`` a Gumbel-softmax
    mixture of code vectors over the filtered logits (as official)."""
    embedding = model.vae_quant_proxy[0].embedding
    if more_smooth:
        ratio = si / model.num_stages_minus_1
        tau = max(0.27 * (1 - ratio * 0.95), 0.005)
        h_BlC = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=tau, hard=False, dim=-1, rng=rng) \
            @ embedding.weight.unsqueeze(0)
    else:
        h_BlC = embedding(idx_Bl)
    return h_BlC.transpose(1, 2).reshape(idx_Bl.shape[0], model.Cvae, pn, pn)


def _guided_draw(model: VAR, x_B2lC, cond_B2D, si, cfg, top_ks, top_p, temps, more_smooth, rng):
    """Head on the last blocks' output, CFG mix, draw: (idx_Bl, code map)."""
    B = x_B2lC.shape[0] // 2
    logits_BlV = model.get_logits(x_B2lC, cond_B2D)
    t = cfg * (si / model.num_stages_minus_1)  # the official rounding: ratio first
    logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
    idx_Bl = _draw(logits_BlV, rng, top_ks[si], top_p, temps[si])
    return idx_Bl, _code_map(model, logits_BlV, idx_Bl, si, model.patch_nums[si], more_smooth, rng)


def _conditioning(model: VAR, label_B: torch.Tensor):
    """(cond_B2D for [labels; null], AdaLN input, lvl+pos embeddings, the scale-0 input (2B, first_l, C))."""
    B = label_B.shape[0]
    sos = cond_B2D = model.class_emb(torch.cat((label_B, torch.full_like(label_B, model.num_classes))))
    lvl_pos = model.lvl_embed(model.lvl_1L) + model.pos_1LC
    first = (sos.unsqueeze(1).expand(2 * B, model.first_l, -1) + model.pos_start.expand(2 * B, model.first_l, -1)
             + lvl_pos[:, :model.first_l])
    return cond_B2D, model.shared_ada_lin(cond_B2D), lvl_pos, first


def _replay_draws(model: VAR, B: int, draft_steps: int, rng) -> None:
    """Consume the random numbers of the official refiner's discarded draws for scales 0..N-1: one Exp(1) tensor of
    the probabilities' shape (B * pn^2, V) per scale, which is what ``torch.multinomial`` with one sample draws."""
    device = model.lvl_1L.device
    for pn in model.patch_nums[:draft_steps]:
        torch.empty(B * pn * pn, model.V, device=device).exponential_(generator=rng)


def _caching(model: VAR, enable: bool) -> None:
    for block in model.blocks:
        block.attn.kv_caching(enable)


# ---------------------------------------------------------------------------------------------- the two halves
@torch.no_grad()
def draft(drafter: VAR, B: int, label_B, draft_steps: int, g_seed: Optional[int] = None, cfg: float = 1.5,
          top_k=0, top_p: float = 0.0, more_smooth: bool = False, temp=1.0, *, rng=None, _checked=None):
    """The drafter's half (official ``autoregressive_infer_cfg_draft``): scales ``0..N-1`` with the KV cache.

    Returns ``(f_hat, token_hub, idx_Bl, label_B, rng)``: the accumulated (B, Cvae, H, W) latent, the
    (B, exit_points[N] - first_l, Cvae) next-scale inputs of scales 1..N, the drawn tokens per scale, the labels
    used and the generator used (``drafter.rng`` reseeded with ``g_seed``, the given ``rng``, or None = global).
    """
    _check_pos_int("B", B)
    N = check_draft_steps(draft_steps, len(drafter.patch_nums))
    cfg, top_ks, top_p, temps = _checked or _sampling_options(len(drafter.patch_nums), cfg, top_k, top_p, temp,
                                                             more_smooth, drafter.V)
    quantize = drafter.vae_quant_proxy[0]
    SN = len(drafter.patch_nums)
    with _eval_mode(drafter):
        if rng is None:
            rng = drafter._sampling_rng(g_seed)
        label_B = drafter._sampling_labels(B, label_B, rng)
        cond_B2D, cond_or_gss, lvl_pos, x = _conditioning(drafter, label_B)
        f_hat = cond_B2D.new_zeros(B, drafter.Cvae, drafter.patch_nums[-1], drafter.patch_nums[-1])
        hub, idx_Bl_list = [], []
        _caching(drafter, True)
        try:
            for si in range(N):
                for block in drafter.blocks:
                    x = block(x=x, cond_BD=cond_or_gss, attn_bias=None)
                idx_Bl, h_BChw = _guided_draw(drafter, x, cond_B2D, si, cfg, top_ks, top_p, temps, more_smooth,
                                              rng)
                idx_Bl_list.append(idx_Bl)
                f_hat, next_BChw = quantize.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
                next_BlCv = next_BChw.view(B, drafter.Cvae, -1).transpose(1, 2)
                hub.append(next_BlCv)
                if si + 1 < N:  # the drafter never runs scale N: its input only goes into the hub
                    begin, end = drafter.begin_ends[si + 1]
                    x = (drafter.word_embed(next_BlCv) + lvl_pos[:, begin:end]).repeat(2, 1, 1)
        finally:
            _caching(drafter, False)
    return f_hat, torch.cat(hub, dim=1), idx_Bl_list, label_B, rng


@torch.no_grad()
def refine(refiner: VAR, B: int, label_B, token_hub: torch.Tensor, f_hat: torch.Tensor, draft_steps: int,
           g_seed: Optional[int] = None, cfg: float = 1.5, top_k=0, top_p: float = 0.0, more_smooth: bool = False,
           temp=1.0, *, rng_parity: bool = True, rng=None, _checked=None, _replay_label_draw=False):
    """The refiner's half (official ``autoregressive_infer_cfg_refine``): one block-causal prefill over scales
    ``0..N`` (the drafted ones from ``token_hub``), then scales ``N+1..SN-1`` with the KV cache.

    ``rng_parity=True`` reseeds the refiner's generator with ``g_seed`` (or keeps drawing from ``rng`` / the global
    RNG), replays a label draw when ``label_B`` is None and replays the drafted scales' draws; ``rng_parity=False``
    draws from ``rng`` as it is (pass the drafter's generator to continue its stream). ``label_B`` should be the
    labels the drafter used; None draws them from the generator (the same ones when both use one seed). Returns ``(images in [0, 1], f_hat,
    idx_Bl of scales N..SN-1)``; ``f_hat`` is not modified.
    """
    N = check_draft_steps(draft_steps, len(refiner.patch_nums))
    SN = len(refiner.patch_nums)
    cfg, top_ks, top_p, temps = _checked or _sampling_options(SN, cfg, top_k, top_p, temp, more_smooth, refiner.V)
    P = exit_points(refiner.patch_nums)[N]
    hub_shape = (B, P - refiner.first_l, refiner.Cvae)
    if not isinstance(token_hub, torch.Tensor) or tuple(token_hub.shape) != hub_shape:
        raise ValueError(f"token_hub must be a tensor of shape {hub_shape} for draft_steps={N}, "
                         f"got {tuple(getattr(token_hub, 'shape', ()))}")
    fhat_shape = (B, refiner.Cvae, refiner.patch_nums[-1], refiner.patch_nums[-1])
    if not isinstance(f_hat, torch.Tensor) or tuple(f_hat.shape) != fhat_shape:
        raise ValueError(f"f_hat must be a tensor of shape {fhat_shape}, got {tuple(getattr(f_hat, 'shape', ()))}")
    if not isinstance(rng_parity, bool):
        raise TypeError(f"rng_parity must be a bool, got {type(rng_parity).__name__}")
    quantize, vae = refiner.vae_quant_proxy[0], refiner.vae_proxy[0]
    with _eval_mode(refiner, vae):
        if rng_parity and g_seed is not None:
            rng = refiner._sampling_rng(g_seed)
        if label_B is None:  # drawn, as official (with the same seed: the drafter's labels)
            label_B = refiner._sampling_labels(B, None, rng)
        else:
            if _replay_label_draw:  # the official refiner drew labels again; keep the drafter's
                refiner._sampling_labels(B, None, rng)
            label_B = refiner._sampling_labels(B, label_B, rng)
        if rng_parity:
            _replay_draws(refiner, B, N, rng)
        cond_B2D, cond_or_gss, lvl_pos, first = _conditioning(refiner, label_B)
        prefix = (refiner.word_embed(token_hub.to(first.dtype)) + lvl_pos[:, refiner.first_l:P]).repeat(2, 1, 1)
        x = torch.cat((first, prefix), dim=1)
        f_hat = f_hat.clone()
        idx_Bl_list = []
        _caching(refiner, True)
        try:
            attn_bias = code_prefill_visible_end(refiner.patch_nums, N, device=x.device)
            for si in range(N, SN):
                for block in refiner.blocks:
                    x = block(x=x, cond_BD=cond_or_gss, attn_bias=attn_bias)
                attn_bias = None
                pn = refiner.patch_nums[si]
                idx_Bl, h_BChw = _guided_draw(refiner, x[:, -pn * pn:], cond_B2D, si, cfg, top_ks, top_p, temps,
                                              more_smooth, rng)
                idx_Bl_list.append(idx_Bl)
                f_hat, next_BChw = quantize.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
                if si + 1 < SN:
                    begin, end = refiner.begin_ends[si + 1]
                    next_BlCv = next_BChw.view(B, refiner.Cvae, -1).transpose(1, 2)
                    x = (refiner.word_embed(next_BlCv) + lvl_pos[:, begin:end]).repeat(2, 1, 1)
        finally:
            _caching(refiner, False)
        img = check_images_finite(vae.fhat_to_img(f_hat).add_(1).mul_(0.5), "collaborative_infer_cfg")
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
    SN = len(drafter.patch_nums)
    check_draft_steps(draft_steps, SN)
    checked = _sampling_options(SN, cfg, top_k, top_p, temp, more_smooth, drafter.V)
    if not isinstance(rng_parity, bool):
        raise TypeError(f"rng_parity must be a bool, got {type(rng_parity).__name__}")
    draft_f_hat, hub, draft_idx, labels, rng = draft(drafter, B, label_B, draft_steps, g_seed, more_smooth=more_smooth,
                                                     _checked=checked)
    img, f_hat, refine_idx = refine(refiner, B, labels, hub, draft_f_hat, draft_steps, g_seed,
                                    more_smooth=more_smooth, rng_parity=rng_parity,
                                    rng=None if rng_parity else rng, _checked=checked,
                                    _replay_label_draw=rng_parity and label_B is None)
    if not return_details:
        return img
    return CoDeResult(img, draft_idx, refine_idx, draft_f_hat, hub, f_hat)
