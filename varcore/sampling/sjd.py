"""Speculative Jacobi decoding (SJD): the verification of one window of draft tokens.

A window feeds the last committed step and drafts for the next steps in one forward pass. The pass gives the
model's distribution ``p`` at every position of the window; the drafts were drawn from known distributions ``q``.
Draft token ``d`` at a position is accepted when ``u < min(1, p(d) / q(d))`` for a fresh uniform ``u``, tested in
order; the first rejected token is redrawn from ``max(0, p - q)`` normalised (speculative sampling: the token that
comes out has distribution ``p`` given its prefix, whatever ``q`` is). A draft chosen without a distribution (a
random initial draft) has ``q`` one-hot on it, for which the rule accepts with probability ``p(d)`` and the redraw
is ``p`` without ``d``. A step of several tokens (a PAR group, drawn independently given the prefix) is tested
token by token and accepted when all its tokens are.

:class:`varcore.sampling.par.PARSampler` runs the loop (``sjd=``); docs/par.md describes it.
"""
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["accept", "residual", "verify", "uniforms", "random_drafts", "check_window"]

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def check_window(sjd, max_steps: int) -> int:
    """The window length ``sjd``: None or 0 (off, returned as 0) or an int in [1, ``max_steps``]; a ValueError
    naming ``sjd`` otherwise."""
    if sjd is None:
        return 0
    if isinstance(sjd, bool) or not isinstance(sjd, int) or not 0 <= sjd <= max_steps:
        raise ValueError(f"sjd must be None, 0 (off) or an int in [1, {max_steps}] (the window length in steps), "
                         f"got {sjd!r}")
    return sjd


def accept(u: torch.Tensor, p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """Whether each draft is accepted: ``u < min(1, p_d / q_d)``, written ``u * q_d < p_d`` (``q_d > 0``: a draft
    was drawn from ``q``), in float64."""
    return u.double() * q_d.double() < p_d.double()


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The redraw weights after a rejection, ``max(0, p - q)`` per row (unnormalised), or ``p`` itself for a row
    whose difference is zero everywhere: there ``p <= q``, so ``p == q`` and a rejection has probability 0; it can
    only come from the rounding of two computations of the same distribution."""
    weights = (p - q).clamp_(min=0)
    empty = weights.sum(dim=-1, keepdim=True) <= 0
    return torch.where(empty, p, weights)


def verify(drafts: torch.Tensor, p_d: torch.Tensor, q_d: torch.Tensor, u: torch.Tensor,
           committed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The tests of a window's drafts (B, k, g) (k steps of g tokens) given ``p_d`` and ``q_d`` (B, k, g) (the
    model's and the draft's probability of each draft token) and uniforms ``u`` (B, k, g): ``(ok, accepted)``,
    ``ok`` (B, k, g) bool per token and ``accepted`` (B,) int64, the number of leading steps whose tokens all
    passed (a step after a failed one is not a draft of the right prefix any more). ``committed`` (B, k) bool marks
    the steps a row has already committed: they are not tested again and count as passed."""
    if not (drafts.shape == p_d.shape == q_d.shape == u.shape) or drafts.ndim != 3:
        raise ValueError(f"drafts, p_d, q_d and u must share one (B, k, g) shape, got {tuple(drafts.shape)}, "
                         f"{tuple(p_d.shape)}, {tuple(q_d.shape)}, {tuple(u.shape)}")
    ok = accept(u, p_d, q_d)
    if committed is not None:
        ok = ok | committed[..., None]
    accepted = ok.all(dim=-1).long().cumprod(dim=-1).sum(dim=-1)
    return ok, accepted


def uniforms(B: int, k: int, generator: Generators, device) -> torch.Tensor:
    """(B, k) float64 uniforms in [0, 1): one ``torch.rand`` from ``generator`` (or the global RNG), or row b from
    generator b of a sequence of B."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(B, k, dtype=torch.float64, device=device, generator=generator)
    return torch.stack([torch.rand(k, dtype=torch.float64, device=device, generator=g) for g in generator])


def random_drafts(B: int, k: int, V: int, generator: Generators, device) -> torch.Tensor:
    """(B, k) initial draft tokens, uniform over [0, V), drawn as :func:`uniforms` draws (one generator or one per
    row)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randint(0, V, (B, k), device=device, generator=generator)
    return torch.stack([torch.randint(0, V, (k,), device=device, generator=g) for g in generator])
