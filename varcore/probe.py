"""Dependency probe: how much do tokens that a parallel sampler draws together actually depend on each other?

VAR draws every token of a scale at once, as if they were conditionally independent given the coarser scales; PAR
draws distant tokens of a flat grid together, assuming they are weakly dependent. This module measures both
assumptions on trained models (definitions in ``docs/probe.md``):

* :func:`gpt_dependency` -- for a GPT trained in raster order: the mean KL divergence between the model's prediction
  of token j with an earlier token i as drawn and with i resampled from the model, as a function of the spatial
  offset (and Chebyshev distance) between i and j.
* :func:`neighbour_mi` and :func:`mutual_information` -- plug-in mutual information between neighbouring tokens of
  token maps, with a permutation baseline that removes the estimator's positive bias.
* :func:`var_prediction_entropy` -- per scale, the mean entropy of VAR's per-token predictions given the coarser
  scales (teacher forcing on real token maps).
* :func:`probe_var` and :func:`probe_gpt` run these on a model and data; :func:`run_probe` on the bundled digits
  models (``varcore probe``).

All quantities are in nats.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["MIResult", "plugin_entropy", "mutual_information", "neighbour_pairs", "neighbour_mi",
           "gpt_dependency", "gpt_logits_fn", "var_prediction_entropy", "probe_var", "probe_gpt", "run_probe"]


# ---------------------------------------------------------------------------------------------- estimators
def _check_tokens(x, name: str, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.numel() and int(x.min()) < 0:
        raise ValueError(f"{name} must hold non-negative token ids")
    return x


def _entropy_of_counts(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double()
    p = p / p.sum()
    return float(-(p * p.log()).sum())


def plugin_entropy(tokens: torch.Tensor) -> float:
    """Plug-in (maximum-likelihood) entropy in nats of the empirical distribution of ``tokens`` (any shape)."""
    tokens = _check_tokens(tokens, "tokens").reshape(-1)
    if tokens.numel() == 0:
        raise ValueError("tokens must not be empty")
    return _entropy_of_counts(torch.unique(tokens, return_counts=True)[1])


def _plugin_mi(a: torch.Tensor, b: torch.Tensor, nb: int) -> float:
    """Plug-in MI of dense ids a in [0, na), b in [0, nb): H(A) + H(B) - H(A, B)."""
    joint = torch.unique(a * nb + b, return_counts=True)[1]
    ha = _entropy_of_counts(torch.unique(a, return_counts=True)[1])
    hb = _entropy_of_counts(torch.unique(b, return_counts=True)[1])
    return max(ha + hb - _entropy_of_counts(joint), 0.0)


@dataclass
class MIResult:
    """Mutual information between paired samples (nats).

    ``plugin`` is the plug-in estimate H(A) + H(B) - H(A, B) of the empirical joint distribution; ``baseline`` the
    mean plug-in estimate after randomly permuting B against A (dependence removed, marginals and sample size kept),
    which is the estimator's bias for independent variables; ``corrected`` = ``plugin - baseline``. ``h_a`` and
    ``h_b`` are the plug-in marginal entropies, ``normalized`` = ``corrected / min(h_a, h_b)`` (0 for independent,
    1 when one determines the other), ``n`` the number of pairs.
    """

    plugin: float
    baseline: float
    corrected: float
    h_a: float
    h_b: float
    normalized: float
    n: int


def mutual_information(a: torch.Tensor, b: torch.Tensor, permutations: int = 8,
                       generator: Optional[torch.Generator] = None) -> MIResult:
    """Mutual information between the paired token ids ``a`` and ``b`` (same number of elements): see
    :class:`MIResult`. ``permutations`` (>= 0) random permutations estimate the bias baseline (0: no baseline)."""
    a = _check_tokens(a, "a").reshape(-1).cpu()
    b = _check_tokens(b, "b").reshape(-1).cpu()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(f"a and b must be non-empty and pair up, got {a.numel()} and {b.numel()} elements")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 0:
        raise ValueError(f"permutations must be an int >= 0, got {permutations!r}")
    a = torch.unique(a, return_inverse=True)[1]  # dense ids keep the joint index small
    b_vals, b = torch.unique(b, return_inverse=True)
    nb = b_vals.numel()
    plugin = _plugin_mi(a, b, nb)
    baseline = 0.0
    if permutations:
        gen = generator or torch.Generator().manual_seed(0)
        baseline = sum(_plugin_mi(a, b[torch.randperm(b.numel(), generator=gen)], nb)
                       for _ in range(permutations)) / permutations
    ha = _entropy_of_counts(torch.bincount(a))
    hb = _entropy_of_counts(torch.bincount(b))
    corrected = plugin - baseline
    h_min = min(ha, hb)
    return MIResult(plugin, baseline, corrected, ha, hb, corrected / h_min if h_min > 0 else 0.0, a.numel())


def neighbour_pairs(maps: torch.Tensor):
    """All horizontally and vertically adjacent token pairs of the maps ``(N, h, w)``: two 1-D tensors (a, b) with
    a the left / upper token and b its right / lower neighbour."""
    maps = _check_tokens(maps, "maps", 3)
    a = torch.cat((maps[:, :, :-1].reshape(-1), maps[:, :-1, :].reshape(-1)))
    b = torch.cat((maps[:, :, 1:].reshape(-1), maps[:, 1:, :].reshape(-1)))
    return a, b


def neighbour_mi(maps: torch.Tensor, permutations: int = 8, generator: Optional[torch.Generator] = None
                 ) -> Optional[MIResult]:
    """:func:`mutual_information` between 4-neighbours of the token maps ``(N, h, w)`` (None for 1 x 1 maps)."""
    a, b = neighbour_pairs(maps)
    if a.numel() == 0:
        return None
    return mutual_information(a, b, permutations, generator)


# ---------------------------------------------------------------------------------------------- (a) GPT
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gpt_logits_fn(model) -> LogitsFn:
    """Teacher-forced logits of a raster :class:`varcore.models.gpt.Transformer`: ``fn(tokens (B, L), labels (B,))
    -> (B, L, V)`` float32, where output t is the model's (class-conditional, unguided) prediction of token t from
    tokens 0 .. t-1."""
    from varcore.models.gpt import Transformer

    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a varcore.models.gpt.Transformer, got {type(model).__name__}")
    if model.M != 1:
        raise ValueError(f"gpt_dependency needs a raster-trained GPT (M=1), got a PAR model with M={model.M}")

    def fn(tokens, labels):
        return model.forward_teacher(tokens[:, :-1], labels).float()

    return fn


@torch.no_grad()
def gpt_dependency(logits_fn: LogitsFn, tokens: torch.Tensor, labels: torch.Tensor, grid: int,
                   positions: Optional[Sequence[int]] = None, resamples: int = 1,
                   generator: Optional[torch.Generator] = None, chunk: int = 256) -> dict:
    """Dependency of token j on an earlier token i (raster order) against their spatial offset.

    For each sequence ``tokens[b]`` (B, L = grid^2), each source position i in ``positions`` (default: all) and
    ``resamples`` draws x_i' ~ p(x_i | x_<i), the model's predictions of every later token j are recomputed with
    x_i replaced by x_i' (all other tokens kept) and D(i, j) = KL(p(x_j | x) || p(x_j | x with x_i')) is recorded.
    Returns ``{"by_offset": {(dy, dx): mean KL}, "by_distance": {d: mean KL}, "count_by_distance": {d: pairs}}``
    with d = max(|dy|, |dx|) (Chebyshev distance on the grid) and means over sequences, draws and pairs.
    """
    tokens = _check_tokens(tokens, "tokens", 2)
    B, L = tokens.shape
    if isinstance(grid, bool) or not isinstance(grid, int) or grid * grid != L:
        raise ValueError(f"grid must be an int with grid^2 = L = {L}, got {grid!r}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (B,):
        raise ValueError(f"labels must be a tensor of shape ({B},)")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an int >= 1, got {resamples!r}")
    positions = list(range(L - 1)) if positions is None else [int(p) for p in positions]
    if any(not 0 <= p < L - 1 for p in positions):
        raise ValueError(f"positions must lie in [0, {L - 1}) (a source needs a later token)")
    gen = generator or torch.Generator().manual_seed(0)

    base = logits_fn(tokens, labels)  # (B, L, V)
    base_logp = F.log_softmax(base, dim=-1)
    # every (sequence, source, draw) as one row of a batch of modified sequences
    src = torch.tensor(positions).repeat_interleave(resamples).repeat(B)
    seq = torch.arange(B).repeat_interleave(len(positions) * resamples)
    probs_i = base_logp[seq, src].exp().cpu()
    drawn = torch.multinomial(probs_i, 1, generator=gen).squeeze(1).to(tokens.device)
    kl_sum = torch.zeros(L, L, dtype=torch.float64)  # [i, j]
    for lo in range(0, seq.numel(), chunk):
        s, i = seq[lo:lo + chunk], src[lo:lo + chunk]
        mod = tokens[s].clone()
        mod[torch.arange(s.numel()), i] = drawn[lo:lo + chunk]
        logp = F.log_softmax(logits_fn(mod, labels[s]), dim=-1)
        p = base_logp[s]
        kl = (p.exp() * (p - logp)).sum(-1).clamp_min(0).double().cpu()  # (n, L): KL at every j
        kl_sum.index_add_(0, i, kl)
    n_per_source = B * resamples
    ys, xs = torch.arange(L) // grid, torch.arange(L) % grid
    by_offset: Dict[tuple, list] = {}
    for i in sorted(set(positions)):
        for j in range(i + 1, L):
            off = (int(ys[j] - ys[i]), int(xs[j] - xs[i]))
            by_offset.setdefault(off, []).append(float(kl_sum[i, j]) / (n_per_source * positions.count(i)))
    by_distance: Dict[int, list] = {}
    for (dy, dx), vals in by_offset.items():
        by_distance.setdefault(max(abs(dy), abs(dx)), []).extend(vals)
    return {"by_offset": {k: sum(v) / len(v) for k, v in sorted(by_offset.items())},
            "by_distance": {d: sum(v) / len(v) for d, v in sorted(by_distance.items())},
            "count_by_distance": {d: len(v) * n_per_source for d, v in sorted(by_distance.items())}}


# ---------------------------------------------------------------------------------------------- (b) VAR
def _entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def var_prediction_entropy(var, vae, idx_Bl: List[torch.Tensor], labels: torch.Tensor, chunk: int = 64
                           ) -> List[float]:
    """Per scale, the mean entropy (nats) of VAR's per-token predictions p(x_t | coarser scales, class), by teacher
    forcing on the token maps ``idx_Bl`` (one (B, pn^2) tensor per scale) with the class ``labels`` (unguided)."""
    if len(idx_Bl) != len(var.patch_nums):
        raise ValueError(f"idx_Bl must hold {len(var.patch_nums)} scales, got {len(idx_Bl)}")
    was = var.training
    var.eval()
    sums = torch.zeros(len(var.patch_nums), dtype=torch.float64)
    try:
        for lo in range(0, labels.shape[0], chunk):
            part = [x[lo:lo + chunk] for x in idx_Bl]
            x_in = vae.quantize.idxBl_to_var_input(part)
            ent = _entropy_of_logits(var(labels[lo:lo + chunk], x_in))  # (b, L)
            for si, (begin, end) in enumerate(var.begin_ends):
                sums[si] += ent[:, begin:end].double().mean(1).sum().cpu()
    finally:
        var.train(was)
    return (sums / labels.shape[0]).tolist()


def _maps(idx_Bl: List[torch.Tensor]) -> List[torch.Tensor]:
    out = []
    for x in idx_Bl:
        pn = math.isqrt(x.shape[1])
        out.append(x.reshape(x.shape[0], pn, pn).cpu())
    return out


def probe_var(var, vae, real_idx_Bl: List[torch.Tensor], labels: torch.Tensor, gen_idx_Bl: List[torch.Tensor],
              permutations: int = 8) -> List[dict]:
    """Per scale: neighbour MI in real and generated token maps (:class:`MIResult` fields, ``real_*`` / ``gen_*``),
    the plug-in entropy of the scale's token distribution in real maps (``h_tokens``), and the mean entropy of
    VAR's per-token predictions given the coarser scales on real maps (``h_pred``)."""
    h_pred = var_prediction_entropy(var, vae, real_idx_Bl, labels)
    rows = []
    for si, (real, gen) in enumerate(zip(_maps(real_idx_Bl), _maps(gen_idx_Bl))):
        row = dict(scale=si, pn=real.shape[1], h_tokens=plugin_entropy(real), h_pred=h_pred[si])
        for tag, maps in (("real", real), ("gen", gen)):
            mi = neighbour_mi(maps, permutations)
            for k, v in (asdict(mi) if mi else {}).items():
                row[f"{tag}_{k}"] = v
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- runners
@torch.no_grad()
def probe_gpt(model, labels: torch.Tensor, tokens: Optional[torch.Tensor] = None, positions=None, resamples: int = 1,
              seed: int = 0) -> dict:
    """:func:`gpt_dependency` of a raster GPT on ``tokens`` (B, L), by default sequences the model draws itself
    (raster decoding, no guidance, no filtering: the model's own distribution) for ``labels``."""
    from varcore.sampling.par import PARSampler

    gen = torch.Generator().manual_seed(seed)
    if tokens is None:
        tokens = PARSampler(model).sample_tokens(labels, cfg_scale=1.0, generator=gen, order="par")
    was = model.training
    model.eval()
    try:
        return gpt_dependency(gpt_logits_fn(model), tokens, labels, model.config.grid, positions, resamples, gen)
    finally:
        model.train(was)


def run_probe(split: str = "all", seed: int = 0, permutations: int = 8, gpt_sequences: int = 64,
              gpt_sources: int = 16, resamples: int = 2, max_images: Optional[int] = None,
              weights_root=None) -> dict:
    """Run the probe on the bundled digits models: (b) on the VAR (``var-drafter``) with the digits of ``split``
    (the first ``max_images`` if given) tokenised by its VQVAE against as many maps the VAR draws for the same
    labels, (a) on the raster GPT (``gpt-raster``) over ``gpt_sequences`` sequences it draws, from ``gpt_sources``
    evenly spaced source positions.
    Sampling is unguided and unfiltered (cfg 0 / 1, no top-k/top-p): the models' own distributions. Returns a
    JSON-ready dict (see ``docs/probe.md``)."""
    from varcore.digits.data import load_digits
    from varcore.digits.recipe import load_weights
    from varcore.sampling.var import VARSampler

    images, labels = load_digits(split)
    if max_images is not None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
        images, labels = images[:max_images], labels[:max_images]
    vae = load_weights("vqvae", root=weights_root)
    var = load_weights("var-drafter", vae=vae, root=weights_root)
    with torch.no_grad():
        real = vae.img_to_idxBl(images)
        gen_idx = VARSampler(var, vae).sample(labels.shape[0], labels, g_seed=seed, cfg=0.0, output="tokens")
    out: dict = {"split": split, "n_images": int(labels.shape[0]), "seed": seed, "permutations": permutations,
                 "var": probe_var(var, vae, real, labels, gen_idx, permutations)}
    gpt = load_weights("gpt-raster", root=weights_root)
    L = gpt.block_size
    step = max(1, (L - 1) // gpt_sources)
    g = torch.Generator().manual_seed(seed)
    gpt_labels = torch.randint(0, gpt.num_classes, (gpt_sequences,), generator=g)
    dep = probe_gpt(gpt, gpt_labels, positions=range(0, L - 1, step), resamples=resamples, seed=seed)
    out["gpt"] = {"grid": gpt.config.grid, "sequences": gpt_sequences, "sources": len(range(0, L - 1, step)),
                  "resamples": resamples,
                  "by_distance": {str(k): v for k, v in dep["by_distance"].items()},
                  "count_by_distance": {str(k): v for k, v in dep["count_by_distance"].items()},
                  "by_offset": {f"{dy},{dx}": v for (dy, dx), v in dep["by_offset"].items()}}
    return out
