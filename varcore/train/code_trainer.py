"""CoDe fine-tuning: the drafter on its N scales, the refiner by distillation from a frozen teacher VAR.

Facts (spec ``code_par_llamagen.md`` A.6): CoDe's training code is not released; its ``utils/losses.py`` holds a
distillation loss ``KL(teacher || student)`` at temperature T scaled by T^2 (optionally mixed with cross-entropy,
``alpha * KD + (1 - alpha) * CE``), its ``forward(..., mask_l)`` truncates the sequence to the first scales, and
CoDe's maintainer describes the recipe: the drafter (VAR-d30) is fine-tuned with ground-truth labels on its
small scales only; the refiner (VAR-d16) is distilled over all scales, then only on the large ones.

Here that becomes:

* :func:`drafter_loss` / :class:`DrafterTrainer`: token cross-entropy over the first N scales, computed on the
  ``mask_l``-truncated forward pass (the block-causal mask makes those logits the full pass's, for less work).
* :func:`refiner_loss` / :class:`RefinerTrainer`: ``L = sum_k w_k KL_k`` with ``w_k = lambda_ep`` on the drafter's
  scales (k <= N, counting scales from 1) and 1 on the refiner's, where ``KL_k`` is scale k's share of the
  token-mean ``T^2 KL(softmax(t / T) || softmax(s / T))`` (with every ``w_k = 1`` the loss is the token mean, as
  the official ``batchmean``). ``lambda_ep`` decays from 1 to 0 over training (:func:`drafter_scale_weight`:
  linear, cosine, or ``step`` -- the maintainer's two stages). Teacher and student see the same labels, with class
  dropout applied once for both.
* :func:`main`: ``python -m varcore.train.code_trainer`` on the VAR training loop (its data, optimiser, schedule,
  checkpoints and torchrun support), e.g.::

      python -m varcore.train.code_trainer --role drafter --draft-steps 8 --vae vae_ch160v4096z32.pth \\
          --init-var var_d30.pth --depth 30 --data /imagenet/train --iters 20000 --out runs/drafter8
      python -m varcore.train.code_trainer --role refiner --draft-steps 8 --teacher var_d30.pth \\
          --init-var var_d16.pth --depth 16 --kd-temp 1.0 --lambda-schedule step --data ... --out runs/refiner8
"""
import argparse
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from varcore.argtypes import finite_float, positive_float
from varcore.models import VAR, VQVAE
from varcore.models.code import check_code_pair, check_draft_steps, exit_points
from varcore.train import distributed as _distributed
from varcore.train import var_trainer
from varcore.train.losses import scale_token_weights, var_loss
from varcore.train.var_trainer import TrainConfig, VARTrainer

__all__ = ["drafter_loss", "distillation_kl", "refiner_loss", "drafter_scale_weight", "LAMBDA_SCHEDULES",
           "DrafterTrainer", "RefinerTrainer", "main"]

LAMBDA_SCHEDULES = ("linear", "cosine", "step", "constant")


# ---------------------------------------------------------------------------------------------- losses
def drafter_loss(logits_BlV: torch.Tensor, gt_BL: torch.Tensor, patch_nums: Sequence[int], draft_steps: int,
                 label_smoothing: float = 0.0, scale_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Cross-entropy on the first N = ``draft_steps`` scales only.

    ``logits_BlV`` holds the logits of those scales (``forward(..., mask_l=exit_points[N-1])``) or of all scales
    (then cut); ``gt_BL`` the ground-truth tokens of all scales or of the prefix. ``scale_weights`` (N values)
    re-weight the scales; by default every token weighs the same, as the official loss.
    """
    N = check_draft_steps(draft_steps, len(patch_nums))
    mask_l = exit_points(patch_nums)[N - 1]
    if logits_BlV.ndim != 3 or logits_BlV.shape[1] < mask_l or gt_BL.ndim != 2 or gt_BL.shape[1] < mask_l:
        raise ValueError(f"logits_BlV (B, >= {mask_l}, V) and gt_BL (B, >= {mask_l}) must cover the first {N} "
                         f"scales, got {tuple(logits_BlV.shape)} and {tuple(gt_BL.shape)}")
    weight_1l = scale_token_weights(tuple(patch_nums)[:N], scale_weights, device=logits_BlV.device)
    return var_loss(logits_BlV[:, :mask_l], gt_BL[:, :mask_l], weight_1l, label_smoothing)


def distillation_kl(student_BLV: torch.Tensor, teacher_BLV: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Per-token ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` summed over the vocabulary: (B, L),
    float32. Gradients flow into the student only."""
    if student_BLV.shape != teacher_BLV.shape or student_BLV.ndim != 3:
        raise ValueError(f"student and teacher logits must both be (B, L, V), got {tuple(student_BLV.shape)} and "
                         f"{tuple(teacher_BLV.shape)}")
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not T > 0:
        raise ValueError(f"T must be a number > 0, got {T!r}")
    log_p_s = F.log_softmax(student_BLV.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_BLV.detach().float() / T, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * (T * T)


def refiner_loss(student_BLV: torch.Tensor, teacher_BLV: torch.Tensor, patch_nums: Sequence[int], draft_steps: int,
                 lambda_ep: float, T: float = 1.0, gt_BL: Optional[torch.Tensor] = None, alpha: float = 1.0,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """``sum_k (lambda_ep * 1[k <= N] + 1[k > N]) * KL_k`` over all scales (k from 1), ``KL_k`` being scale k's
    share of the token-mean distillation KL at temperature ``T`` (see :func:`distillation_kl`). With ``alpha < 1``
    the loss is ``alpha * KD + (1 - alpha) * CE(student, gt_BL)`` (token-mean cross-entropy), as CoDe's
    ``distillation_loss``."""
    N = check_draft_steps(draft_steps, len(patch_nums))
    if not 0.0 <= lambda_ep <= 1.0:
        raise ValueError(f"lambda_ep must be in [0, 1], got {lambda_ep}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    L = exit_points(patch_nums)[-1]
    if student_BLV.ndim != 3 or student_BLV.shape[1] != L:
        raise ValueError(f"student_BLV must be (B, {L}, V), got {tuple(student_BLV.shape)}")
    kl_BL = distillation_kl(student_BLV, teacher_BLV, T)
    weight_L = torch.ones(L, device=kl_BL.device)
    weight_L[:exit_points(patch_nums)[N - 1]] = lambda_ep
    loss = (kl_BL * weight_L).sum(dim=-1).div(L).mean()
    if alpha < 1.0:
        if gt_BL is None:
            raise ValueError("gt_BL is needed when alpha < 1 (the cross-entropy part)")
        uniform = torch.full((1, L), 1.0 / L, device=kl_BL.device)
        loss = alpha * loss + (1 - alpha) * var_loss(student_BLV, gt_BL, uniform, label_smoothing)
    return loss


def drafter_scale_weight(progress: float, schedule: str = "linear", stage1_frac: float = 0.5) -> float:
    """``lambda_ep`` at ``progress`` = epoch / epochs (or step / steps) in [0, 1]: 1 at the start, 0 at the end.

    ``linear`` 1 - p; ``cosine`` (1 + cos(pi p)) / 2; ``step`` 1 until ``stage1_frac`` then 0 (distil on all
    scales, then on the refiner's only: the maintainer's two stages); ``constant`` always 1.
    """
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"schedule must be one of {LAMBDA_SCHEDULES}, got {schedule!r}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if not 0.0 <= stage1_frac <= 1.0:
        raise ValueError(f"stage1_frac must be in [0, 1], got {stage1_frac}")
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 1.0 if progress < stage1_frac else 0.0
    return 1.0


# ---------------------------------------------------------------------------------------------- trainers
class DrafterTrainer(VARTrainer):
    """Fine-tunes a drafter on ground-truth tokens of its first ``draft_steps`` scales (cross-entropy on the
    ``mask_l``-truncated forward pass). Otherwise a :class:`~varcore.train.var_trainer.VARTrainer`; with
    ``config.scale_weights`` the first N weights apply."""

    def __init__(self, vae: VQVAE, var: VAR, config: TrainConfig, draft_steps: int, distributed: bool = False):
        super().__init__(vae, var, config, distributed=distributed)
        self.draft_steps = check_draft_steps(draft_steps, len(var.patch_nums))
        self.mask_l = exit_points(var.patch_nums)[self.draft_steps - 1]

    def _loss(self, net, label_B, gt_BL, x_BLCv):
        logits_BlV = net(label_B, x_BLCv, mask_l=self.mask_l)
        weights = None if self.config.scale_weights is None else self.config.scale_weights[:self.draft_steps]
        loss = drafter_loss(logits_BlV, gt_BL, self.var.patch_nums, self.draft_steps, self.config.label_smoothing,
                            weights)
        return loss, logits_BlV, gt_BL[:, :self.mask_l]


class RefinerTrainer(VARTrainer):
    """Distils a refiner from a frozen ``teacher`` VAR (same token space) with :func:`refiner_loss`.

    ``kd_temperature`` is T, ``alpha`` the KD share (1: pure distillation), ``lambda_schedule``/``stage1_frac``
    give ``lambda_ep`` from the training progress ``it / max_iters`` (:func:`drafter_scale_weight`). Class dropout
    (the student's ``cond_drop_rate``) is applied here, once, so that teacher and student see the same labels.
    """

    def __init__(self, vae: VQVAE, var: VAR, config: TrainConfig, teacher: VAR, draft_steps: int,
                 kd_temperature: float = 1.0, alpha: float = 1.0, lambda_schedule: str = "linear",
                 stage1_frac: float = 0.5, distributed: bool = False):
        super().__init__(vae, var, config, distributed=distributed)
        check_code_pair(teacher, var)
        self.draft_steps = check_draft_steps(draft_steps, len(var.patch_nums))
        drafter_scale_weight(0.0, lambda_schedule, stage1_frac)  # validates the schedule
        if not kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.kd_temperature, self.alpha = float(kd_temperature), float(alpha)
        self.lambda_schedule, self.stage1_frac = lambda_schedule, stage1_frac

    @property
    def lambda_ep(self) -> float:
        """The weight of the drafter's scales at the current step."""
        progress = min(self.it / self.config.max_iters, 1.0)
        return drafter_scale_weight(progress, self.lambda_schedule, self.stage1_frac)

    def _loss(self, net, label_B, gt_BL, x_BLCv):
        if self.var.training and self.var.cond_drop_rate > 0:
            drop_B = torch.rand(label_B.shape[0], device=label_B.device) < self.var.cond_drop_rate
            label_B = torch.where(drop_B, self.var.num_classes, label_B)
        with torch.no_grad():
            teacher_BLV = self.teacher(label_B, x_BLCv)
        rate, self.var.cond_drop_rate = self.var.cond_drop_rate, 0.0  # already applied above
        try:
            student_BLV = net(label_B, x_BLCv)
        finally:
            self.var.cond_drop_rate = rate
        loss = refiner_loss(student_BLV, teacher_BLV, self.var.patch_nums, self.draft_steps, self.lambda_ep,
                            self.kd_temperature, gt_BL, self.alpha, self.config.label_smoothing)
        return loss, student_BLV, gt_BL

    @torch.no_grad()
    def teacher_kl(self, label_B: torch.Tensor, idx_Bl: Sequence[torch.Tensor]) -> Dict[str, float]:
        """Eval-mode token-mean KL(teacher || refiner) at temperature 1: over all scales, the drafter's and the
        refiner's."""
        gt_BL, x_BLCv = self._teacher_forcing(idx_Bl, None)
        label_B = label_B.to(self.device)
        was_training = self.var.training
        self.var.eval()
        try:
            kl_BL = distillation_kl(self.var(label_B, x_BLCv), self.teacher(label_B, x_BLCv))
        finally:
            self.var.train(was_training)
        P = exit_points(self.var.patch_nums)[self.draft_steps - 1]
        return {"kl": kl_BL.mean().item(), "kl_draft_scales": kl_BL[:, :P].mean().item(),
                "kl_refine_scales": kl_BL[:, P:].mean().item()}


# ---------------------------------------------------------------------------------------------- command line
def build_arg_parser() -> argparse.ArgumentParser:
    p = var_trainer.build_arg_parser()
    p.prog = "python -m varcore.train.code_trainer"
    p.description = "Fine-tune a CoDe drafter (CE on its N scales) or refiner (distillation from a frozen teacher)."
    c = p.add_argument_group("CoDe")
    c.add_argument("--role", choices=("drafter", "refiner"), required=True)
    c.add_argument("--draft-steps", type=int, default=8, help="N, the drafter's scales (default 8)")
    c.add_argument("--teacher", default=None, help="refiner: the frozen teacher VAR checkpoint (e.g. var_d30.pth)")
    c.add_argument("--kd-temp", type=positive_float, default=1.0, help="refiner: distillation temperature T")
    c.add_argument("--alpha", type=finite_float, default=1.0, help="refiner: KD share, the rest cross-entropy")
    c.add_argument("--lambda-schedule", choices=LAMBDA_SCHEDULES, default="linear",
                   help="refiner: decay of the drafter scales' weight from 1 to 0")
    c.add_argument("--stage1-frac", type=finite_float, default=0.5, help="refiner: 'step' schedule switch point")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    """Command-line entry point (also under torchrun); returns the per-step metrics of this run."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.role == "refiner" and not args.teacher:
        parser.error("--role refiner needs --teacher")
    env = _distributed.setup(args.device)

    def make_trainer(vae, var, config, distributed):
        if args.role == "drafter":
            return DrafterTrainer(vae, var, config, args.draft_steps, distributed=distributed)
        from varcore.checkpoints import load_var  # deferred: checkpoints imports the models

        teacher = load_var(args.teacher, vae)
        return RefinerTrainer(vae, var, config, teacher, args.draft_steps, args.kd_temp, args.alpha,
                              args.lambda_schedule, args.stage1_frac, distributed=distributed)

    try:
        return var_trainer._main(args, env, make_trainer=make_trainer)
    finally:
        _distributed.cleanup(env)


if __name__ == "__main__":
    main()
