"""CoDe (collaborative decoding): a large VAR *drafter* generates the first N scales, a small VAR *refiner* the rest.

The pieces both halves agree on: :func:`exit_points`, the checks of a pair and of N, and :class:`CoDeResult`.
Sampling (official semantics, with the official function names here) is in :mod:`varcore.sampling.code`.
"""
from typing import List, NamedTuple, Sequence

import torch

from .var import VAR

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


# ---------------------------------------------------------------------------------------------- sampling
def __getattr__(name: str):
    """CoDe's sampling functions (``collaborative_infer_cfg``, ``draft``, ``refine``) live in
    :mod:`varcore.sampling.code`, which builds on this module; they stay importable from here."""
    if name in ("collaborative_infer_cfg", "draft", "refine"):
        from varcore.sampling import code

        return getattr(code, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
