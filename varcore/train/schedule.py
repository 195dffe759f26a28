"""Learning-rate and weight-decay schedules of the official VAR training, and its AdamW parameter groups."""
import math
from typing import Dict, List, Optional

import torch.nn as nn

__all__ = ["lr_factor", "weight_decay_at", "param_groups", "NO_WD_KEYS", "SCHEDULES", "check_schedule",
           "progressive_schedule", "prog_si_at", "prog_warmup"]

SCHEDULES = ("lin0", "lin", "cos")  # besides "lin<T>" (e.g. "lin0.8"), the one progressive training uses

# Parameters whose names contain one of these get no weight decay (besides 1-D parameters and biases).
NO_WD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
              "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def lr_factor(it: int, max_iters: int, warmup_iters: int, wp0: float = 0.005, wpe: float = 0.1,
              schedule: str = "lin0") -> float:
    """Multiplier of the peak learning rate at iteration ``it``.

    Linear warm-up from ``wp0`` over ``warmup_iters``, then, over the remaining iterations, ``lin0``: flat for 5%
    and linear down to ``wpe``; ``lin``: flat for 15% and linear down to ``wpe``; ``cos``: half-cosine to ``wpe``;
    ``lin<T>`` (the official schedule of progressive training, T = ``pg``): linear from 1 to ``m = (1 + wpe + (1 -
    wpe)(1 - T)) / 2`` over the first fraction T, then linear from ``m`` to ``wpe``.
    """
    T = check_schedule(schedule)
    if it < warmup_iters:
        return wp0 + (1 - wp0) * it / warmup_iters
    done = min((it - warmup_iters) / max(max_iters - 1 - warmup_iters, 1), 1.0)
    if schedule == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * done))
    if T is not None:
        mid = (1 + (wpe + (1 - wpe) * (1 - T))) / 2  # the official association
        if done < T:
            return 1 + (mid - 1) * done / T
        return wpe + (mid - wpe) * (1 - done) / (1 - T)
    flat = 0.05 if schedule == "lin0" else 0.15
    if done < flat:
        return 1.0
    return wpe + (1 - wpe) * (1 - done) / (1 - flat)


def check_schedule(schedule: str) -> Optional[float]:
    """Validate a learning-rate schedule name; returns T for ``lin<T>`` (0 < T < 1), None for the others."""
    if schedule in SCHEDULES:
        return None
    if isinstance(schedule, str) and schedule.startswith("lin"):
        try:
            T = float(schedule[3:])
        except ValueError:
            T = None
        if T is not None and 0 < T < 1:
            return T
    raise ValueError(f"schedule must be one of {SCHEDULES} or 'lin<T>' with 0 < T < 1, got {schedule!r}")


def progressive_schedule(pg: float) -> str:
    """The learning-rate schedule the official train.py switches to when ``pg > 0``: ``f"lin{pg:g}"``."""
    return f"lin{pg:g}"


def prog_si_at(it: int, max_iters: int, warmup_iters: float, pg: float, pg0: int, num_scales: int) -> int:
    """The last trained scale at iteration ``it`` of progressive training (official train.py), -1 when ``pg`` is 0.

    ``pg0`` up to the end of the warm-up (``it <= warmup_iters``), the last scale from ``it >= pg * max_iters``,
    and in between ``pg0 + round(progress * (num_scales - 1 - pg0))`` with ``progress`` going linearly from 0 to
    1; Python's ``round`` (ties to even) as official.
    """
    if not pg:
        return -1
    if it <= warmup_iters:
        return pg0
    if it >= max_iters * pg:
        return num_scales - 1
    progress = min(max((it - warmup_iters) / (max_iters * pg - warmup_iters), 0), 1)
    return pg0 + round(progress * (num_scales - 1 - pg0))


def prog_warmup(prog_it: int, warmup_iters: float, first_stage: bool) -> float:
    """Loss weight of the newest scale ``prog_it`` steps into a progressive stage (official trainer):
    ``clamp(prog_it / warmup_iters, 0.01, 1)``, 1 throughout the first stage (the lr warm-up covers it)."""
    if first_stage:
        return 1.0
    return max(min(prog_it / warmup_iters, 1), 0.01)


def weight_decay_at(it: int, max_iters: int, wd: float, wd_end: float) -> float:
    """Weight decay cosine-annealed from ``wd`` at the first iteration to ``wd_end`` at the last."""
    done = min(it / max(max_iters - 1, 1), 1.0)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * done))


def param_groups(model: nn.Module) -> List[Dict]:
    """AdamW groups of the trainable parameters: ``wd_sc`` 0 for 1-D parameters, biases and ``NO_WD_KEYS`` names,
    1 otherwise (the group's weight decay is ``wd_sc`` times the scheduled value)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith("bias") or any(k in name for k in NO_WD_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "wd_sc": 1.0}, {"params": no_decay, "wd_sc": 0.0}]
    return [g for g in groups if g["params"]]
