"""Learning-rate and weight-decay schedules of the official VAR training, and its AdamW parameter groups."""
import math
from typing import Dict, List

import torch.nn as nn

__all__ = ["lr_factor", "weight_decay_at", "param_groups", "NO_WD_KEYS", "SCHEDULES"]

SCHEDULES = ("lin0", "lin", "cos")

# Parameters whose names contain one of these get no weight decay (besides 1-D parameters and biases).
NO_WD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
              "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def lr_factor(it: int, max_iters: int, warmup_iters: int, wp0: float = 0.005, wpe: float = 0.1,
              schedule: str = "lin0") -> float:
    """Multiplier of the peak learning rate at iteration ``it``.

    Linear warm-up from ``wp0`` over ``warmup_iters``, then, over the remaining iterations, ``lin0``: flat for 5%
    and linear down to ``wpe``; ``lin``: flat for 15% and linear down to ``wpe``; ``cos``: half-cosine to ``wpe``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if it < warmup_iters:
        return wp0 + (1 - wp0) * it / warmup_iters
    done = min((it - warmup_iters) / max(max_iters - 1 - warmup_iters, 1), 1.0)
    if schedule == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * done))
    flat = 0.05 if schedule == "lin0" else 0.15
    if done < flat:
        return 1.0
    return wpe + (1 - wpe) * (1 - done) / (1 - flat)


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
