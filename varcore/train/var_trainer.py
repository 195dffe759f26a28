"""VAR training: the optimisation step, a small training loop with checkpoints, and a command line.

Recipe of the official trainer (spec section 3): tokens from the frozen VQVAE, teacher-forcing input from
``idxBl_to_var_input``, token cross-entropy, AdamW with betas (0.9, 0.95) and no weight decay on 1-D parameters,
biases and embeddings, linear warm-up then the ``lin0`` decay, weight decay cosine-annealed, gradient clipping at 2,
optional bf16/fp16 autocast (fp16 with a gradient scaler), and the official progressive training (``pg``, ``pg0``,
``pgwp``: scales added one by one over the first fraction ``pg`` of training, see :class:`TrainConfig`).

Command line::

    python -m varcore.train.var_trainer --vae vae_ch160v4096z32.pth --data /imagenet/train --depth 16 \\
        --bs 64 --iters 200000 --out runs/d16
"""
import argparse
import math
import os
import sys
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from varcore.argtypes import device_arg, finite_float, out_dir_arg
from varcore.models import PATCH_NUMS, VAR, VQVAE
from varcore.ops.quant import check_idx
from varcore.ops.value_checks import values_on_host
from varcore.train import distributed as _distributed
from varcore.train.data import ImageFolder, TokenPyramids, split_scales
from varcore.train.losses import scale_token_weights, token_accuracy, token_accuracy_tensor, var_loss
from varcore.train.schedule import (SCHEDULES, check_schedule, lr_factor, param_groups, prog_si_at, prog_warmup,
                                    progressive_schedule, weight_decay_at)

__all__ = ["TrainConfig", "VARTrainer", "train", "build_var_for_training", "main"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_LOSS_SCALE = 2.0 ** 15  # the official fp16 loss-scale cap


def make_optimizer(model: torch.nn.Module, config: "TrainConfig", device: torch.device):
    """AdamW over the official parameter groups (weight decay set per step by :func:`apply_schedule`), the autocast
    dtype, and a loss scaler for fp16 (None otherwise)."""
    groups = param_groups(model)
    if not groups:
        raise ValueError(f"the {type(model).__name__} has no parameter with requires_grad=True, nothing to train; "
                         f"call model.requires_grad_(True) first")
    # fused (as the official trainers run it on GPUs): one kernel, its step counters on the device, and a
    # device-side skip of the update (found_inf), so that a step never waits for the accelerator
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=0.0,
                                  fused=not values_on_host(device))
    scaler = (torch.amp.GradScaler(device.type, init_scale=2.0 ** 11, growth_interval=1000)
              if config.amp == "fp16" else None)
    return optimizer, AMP_DTYPES[config.amp], scaler


def read_checkpoint(path, device):
    """A trainer checkpoint read with ``torch.load(weights_only=True)``; an empty, truncated or foreign file is
    named as such (see :func:`varcore.checkpoints.read_file`)."""
    from varcore.checkpoints import read_file

    return read_file(path, map_location=device)


def checked_iteration(value, name: str, path) -> int:
    """A checkpoint's step counter: an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: {name} must be an int >= 0, got {value!r}")
    return value


def apply_schedule(optimizer, config: "TrainConfig", it: int) -> float:
    """Set every group's learning rate and weight decay for iteration ``it``; returns the learning rate."""
    lr = config.lr * lr_factor(it, config.max_iters, config.warmup_iters, config.wp0, config.wpe, config.schedule)
    wd_end = config.weight_decay if config.weight_decay_end is None else config.weight_decay_end
    wd = weight_decay_at(it, config.max_iters, config.weight_decay, wd_end)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = lr, wd * group["wd_sc"]
    return lr


def backward_and_step(loss: torch.Tensor, params, optimizer, scaler, grad_clip: float) -> torch.Tensor:
    """One optimiser step from ``loss``: backward (through the fp16 loss scaler when there is one), gradient
    clipping at ``grad_clip`` (none when <= 0), step, and the loss-scale cap. Returns the gradient norm.

    A non-finite loss leaves the weights as they were: on the CPU it raises a FloatingPointError before anything
    is updated; on an accelerator with a fused optimizer the update is skipped on the device (no host
    synchronisation) and :func:`raise_if_loss_nonfinite` reports it when the loss is read. Under the fp16 loss
    scaler, whose job is to skip such steps and lower the scale, nothing is raised."""
    skip_on_device = scaler is None and not values_on_host(loss) and bool(optimizer.defaults.get("fused"))
    if scaler is None and not skip_on_device:
        raise_if_loss_nonfinite(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() > MAX_LOSS_SCALE:
            scaler.update(MAX_LOSS_SCALE)
    elif skip_on_device:
        optimizer.found_inf = (~torch.isfinite(loss.detach())).float()  # read by the fused step, as GradScaler does
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    else:
        optimizer.step()
    return grad_norm


def raise_if_loss_nonfinite(loss, skipped: bool = False) -> None:
    """A FloatingPointError when ``loss`` (a tensor or a float) is NaN or inf; ``skipped``: the update of that step
    was already skipped on the device."""
    value = float(loss)
    if not math.isfinite(value):
        what = "the update was skipped" if skipped else "stopped before the update"
        raise FloatingPointError(f"the training loss is {value}: {what} (NaN or inf in the weights or the data, or "
                                 f"a learning rate that made training diverge)")


def host_metrics(metrics: Dict) -> Dict[str, float]:
    """A step's metrics as Python numbers (the one host synchronisation of a logged step)."""
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


@dataclass
class TrainConfig:
    """Optimisation settings. ``lr`` is the peak learning rate; ``weight_decay_end`` defaults to ``weight_decay``;
    ``wp0``/``wpe`` are the warm-up start and final learning-rate fractions; ``scale_weights`` (one per scale)
    re-weights the loss per scale (None: a plain token mean, as official); ``amp`` is 'none', 'bf16' or 'fp16'.

    Progressive training (the official ``--pg``, ``--pg0``, ``--pgwp``): with ``pg`` in (0, 1) the model is trained
    on scales ``0..prog_si`` only, ``prog_si`` going from ``pg0`` (up to the end of the lr warm-up) to the last
    scale (from ``pg * max_iters`` on), see :func:`varcore.train.schedule.prog_si_at`. The loss weights stay the
    full schedule's (1/L per token by default), cut to the trained tokens, and the newest scale's weight is
    ramped up over ``pgwp`` iterations after each change (not in the first stage). ``pgwp`` defaults to
    ``max_iters / 300`` (official: ``ep / 300`` epochs). ``schedule`` defaults to ``"lin0"``, and to
    ``f"lin{pg:g}"`` under progressive training, which is what the official train.py forces; another explicit
    schedule is kept, with a warning.
    """

    max_iters: int
    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_end: Optional[float] = None
    betas: Tuple[float, float] = (0.9, 0.95)
    warmup_iters: int = 0
    wp0: float = 0.005
    wpe: float = 0.1
    schedule: Optional[str] = None
    grad_clip: float = 2.0
    label_smoothing: float = 0.0
    scale_weights: Optional[Tuple[float, ...]] = None
    amp: str = "none"
    pg: float = 0.0
    pg0: int = 4
    pgwp: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ValueError(f"max_iters must be a positive int, got {self.max_iters!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or (self.weight_decay_end is not None and self.weight_decay_end < 0):
            raise ValueError("weight_decay and weight_decay_end must be >= 0")
        if not isinstance(self.warmup_iters, int) or self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be an int >= 0, got {self.warmup_iters!r}")
        if isinstance(self.pg, bool) or not isinstance(self.pg, (int, float)) or not 0 <= self.pg < 1:
            raise ValueError(f"pg must be a number in [0, 1) (0: no progressive training), got {self.pg!r}")
        if isinstance(self.pg0, bool) or not isinstance(self.pg0, int) or self.pg0 < 0:
            raise ValueError(f"pg0 must be an int >= 0 (a scale index), got {self.pg0!r}")
        if self.pgwp is None:
            self.pgwp = self.max_iters / 300
        if isinstance(self.pgwp, bool) or not isinstance(self.pgwp, (int, float)) or not self.pgwp > 0:
            raise ValueError(f"pgwp must be > 0 (warm-up iterations of a new scale), got {self.pgwp!r}")
        if self.schedule is None:
            self.schedule = progressive_schedule(self.pg) if self.pg else "lin0"
        elif self.pg and self.schedule != progressive_schedule(self.pg):
            warnings.warn(f"progressive training: the official train.py replaces the lr schedule by "
                          f"{progressive_schedule(self.pg)!r}; keeping the given {self.schedule!r}", stacklevel=3)
        check_schedule(self.schedule)
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        self.betas = tuple(self.betas)
        if self.scale_weights is not None:
            self.scale_weights = tuple(float(w) for w in self.scale_weights)


class VARTrainer:
    """Trains ``var`` on token pyramids of the frozen ``vae``.

    ``train_step`` takes a batch of labels and either ground-truth tokens ``idx_Bl`` (one (B, pn^2) tensor per
    scale) or images in [-1, 1] (tokenised with ``vae.img_to_idxBl``). Checkpoints use the official nesting
    ``{"iter", "trainer": {"config", "var_wo_ddp", "var_opt"}, "args"}``, so ``varcore.checkpoints.load_var``
    reads them; the frozen VAE is not stored.

    ``distributed=True`` (inside a torch.distributed process group, see :mod:`varcore.train.distributed`) runs the
    forward pass through DistributedDataParallel, reports metrics averaged over the ranks and lets only rank 0
    write checkpoints; ``var`` itself stays unwrapped (``var_wo_ddp``).
    """

    def __init__(self, vae: VQVAE, var: VAR, config: TrainConfig, distributed: bool = False):
        if not isinstance(vae, VQVAE):
            raise TypeError(f"vae must be a VQVAE, got {type(vae).__name__}")
        if not isinstance(var, VAR):
            raise TypeError(f"var must be a VAR, got {type(var).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if var.vae_proxy[0] is not vae:
            raise ValueError("var must have been built on this vae (var.vae_proxy[0] is not vae)")
        self.vae, self.var, self.config = vae, var, config
        self.device = var.lvl_1L.device
        self.distributed = check_distributed(distributed)
        self.net = _distributed.wrap_ddp(var) if distributed else var  # what the forward pass runs through
        self.token_weight_1L = scale_token_weights(var.patch_nums, config.scale_weights, device=self.device)
        self.optimizer, self.amp_dtype, self.scaler = make_optimizer(var, config, self.device)
        self.it = 0
        if config.pg:
            if config.pg0 > len(var.patch_nums) - 1:
                raise ValueError(f"pg0 must be <= {len(var.patch_nums) - 1} for {len(var.patch_nums)} scales, "
                                 f"got {config.pg0}")
            if type(self)._loss is not VARTrainer._loss:
                raise ValueError(f"progressive training (pg > 0) is only supported with VAR's token loss, not by "
                                 f"{type(self).__name__}")
        # progressive training state, as the official trainer keeps it (saved in checkpoints)
        self.prog_it, self.last_prog_si, self.first_prog = 0, -1, True
        self._step_weight_1L = self.token_weight_1L

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def _teacher_forcing(self, idx_Bl: Optional[Sequence[torch.Tensor]], img_B3HW: Optional[torch.Tensor]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Targets (B, l) and inputs (B, l - first_l, Cvae) of the scales the quantiser's ``prog_si`` selects."""
        if (idx_Bl is None) == (img_B3HW is None):
            raise ValueError("pass exactly one of idx_Bl and img_B3HW")
        if img_B3HW is not None:
            idx_Bl = self.vae.img_to_idxBl(img_B3HW.to(self.device))  # already cut to the trained scales
        idx_Bl = [t.to(self.device) for t in idx_Bl]
        SN, prog_si = len(self.var.patch_nums), self.vae.quantize.prog_si
        if len(idx_Bl) != SN and not (prog_si >= 0 and len(idx_Bl) == prog_si + 1):
            raise ValueError(f"idx_Bl must hold {SN} scales, got {len(idx_Bl)}")
        if prog_si >= 0:
            idx_Bl = idx_Bl[:prog_si + 1]
        for si, t in enumerate(idx_Bl):  # the loss would index out of range with a bad token
            check_idx(t, self.var.V, f"idx_Bl[{si}]")
        x_BLCv = self.vae.quantize.idxBl_to_var_input(idx_Bl)
        if x_BLCv is None:  # prog_si == 0: only the start token (the official trainer fails here)
            x_BLCv = torch.zeros(idx_Bl[0].shape[0], 0, self.var.Cvae, device=self.device)
        return torch.cat(idx_Bl, dim=1), x_BLCv

    def _apply_schedule(self) -> float:
        return apply_schedule(self.optimizer, self.config, self.it)

    def train_step(self, label_B: torch.Tensor, idx_Bl: Optional[Sequence[torch.Tensor]] = None,
                   img_B3HW: Optional[torch.Tensor] = None, prog_si: Optional[int] = None) -> Dict[str, float]:
        """One optimisation step; returns loss, token accuracy (all and last scale, %), gradient norm, lr, and the
        progressive stage ``prog_si`` (-1: all scales) with the newest scale's loss weight ``prog_wp``.

        ``prog_si`` (the official trainer's argument) trains scales ``0..prog_si`` only; None takes it from the
        config's progressive schedule at this iteration (-1 without ``pg``). As official, ``acc_tail`` is -1 while
        not all scales are trained, and the last scale's index counts as all scales. A non-finite loss raises a
        FloatingPointError, the weights unchanged. :meth:`step` is the same step without reading the metrics.
        """
        metrics = host_metrics(self.step(label_B, idx_Bl, img_B3HW, prog_si))
        raise_if_loss_nonfinite(metrics["loss"], skipped=True)
        return metrics

    def step(self, label_B: torch.Tensor, idx_Bl: Optional[Sequence[torch.Tensor]] = None,
             img_B3HW: Optional[torch.Tensor] = None, prog_si: Optional[int] = None) -> Dict:
        """:meth:`train_step` without a host synchronisation on an accelerator: loss, acc, acc_tail and grad_norm
        are 0-dim tensors on the device (read them when you log, e.g. with :func:`host_metrics`), and a
        non-finite loss skips the update on the device instead of raising (on the CPU it raises, as in
        :meth:`train_step`)."""
        SN = len(self.var.patch_nums)
        if prog_si is None:
            prog_si = prog_si_at(self.it, self.config.max_iters, self.config.warmup_iters, self.config.pg,
                                 self.config.pg0, SN)
        if isinstance(prog_si, bool) or not isinstance(prog_si, int) or not -1 <= prog_si <= SN - 1:
            raise ValueError(f"prog_si must be an int in [-1, {SN - 1}], got {prog_si!r}")
        prog_wp = self._advance_prog(prog_si)
        self.var.prog_si = self.vae.quantize.prog_si = prog_si
        try:
            gt_BL, x_BLCv = self._teacher_forcing(idx_Bl, img_B3HW)
            label_B = label_B.to(self.device)
            lr = self._apply_schedule()
            self.var.train()
            prog_si = -1 if prog_si == SN - 1 else prog_si  # the last stage is plain training
            self._step_weight_1L = self._prog_weights(prog_si, prog_wp)
            with self._autocast():
                loss, logits_BLV, gt_BL = self._loss(self.net, label_B, gt_BL, x_BLCv)
            grad_norm = backward_and_step(loss, self.var.parameters(), self.optimizer, self.scaler,
                                          self.config.grad_clip)
        finally:
            self.var.prog_si = self.vae.quantize.prog_si = -1
            self._step_weight_1L = self.token_weight_1L
        self.it += 1
        last_l = self.var.patch_nums[-1] ** 2
        metrics = {"loss": loss.detach(), "acc": token_accuracy_tensor(logits_BLV, gt_BL),
                   "acc_tail": -1.0 if prog_si >= 0 else token_accuracy_tensor(logits_BLV[:, -last_l:],
                                                                               gt_BL[:, -last_l:])}
        if self.distributed:
            metrics = _distributed.mean_over_ranks(metrics, self.device)
        return {**metrics, "grad_norm": grad_norm, "lr": lr, "prog_si": prog_si, "prog_wp": float(prog_wp)}

    def _advance_prog(self, prog_si: int) -> float:
        """Update the progressive stage counters as the official trainer does; returns the newest scale's weight."""
        if self.last_prog_si != prog_si:
            if self.last_prog_si != -1:
                self.first_prog = False
            self.last_prog_si = prog_si
            self.prog_it = 0
        self.prog_it += 1
        return prog_warmup(self.prog_it, self.config.pgwp, self.first_prog)

    def _prog_weights(self, prog_si: int, prog_wp: float) -> torch.Tensor:
        """Token weights of a step: the full schedule's, cut to scales 0..prog_si with the last one times
        ``prog_wp`` (not renormalised, as official)."""
        if prog_si < 0:
            return self.token_weight_1L
        bg, ed = self.var.begin_ends[prog_si]
        weight_1l = self.token_weight_1L[:, :ed].clone()
        weight_1l[:, bg:ed] *= min(max(prog_wp, 0), 1)
        return weight_1l

    @torch.no_grad()
    def eval_step(self, label_B: torch.Tensor, idx_Bl: Optional[Sequence[torch.Tensor]] = None,
                  img_B3HW: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Loss and accuracy on a batch in eval mode (no class dropout), without updating anything."""
        gt_BL, x_BLCv = self._teacher_forcing(idx_Bl, img_B3HW)
        was_training = self.var.training
        self.var.eval()
        try:
            with self._autocast(), torch.no_grad():
                loss, logits_BLV, gt_BL = self._loss(self.var, label_B.to(self.device), gt_BL, x_BLCv)
        finally:
            self.var.train(was_training)
        return {"loss": loss.item(), "acc": token_accuracy(logits_BLV, gt_BL)}

    def _loss(self, net: torch.nn.Module, label_B: torch.Tensor, gt_BL: torch.Tensor, x_BLCv: torch.Tensor):
        """The objective on one batch: (loss, logits, targets), the last two for the accuracy metrics. ``net`` is
        the model (or its DDP wrapper) to run. Subclasses change the objective (CoDe's drafter and refiner)."""
        logits_BLV = net(label_B, x_BLCv)
        return var_loss(logits_BLV, gt_BL, self._step_weight_1L, self.config.label_smoothing), logits_BLV, gt_BL

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict:
        """Trainer state in the official nesting (``var_wo_ddp`` is VAR's state dict)."""
        var_opt = {"optimizer": self.optimizer.state_dict(),
                   "scaler": None if self.scaler is None else self.scaler.state_dict()}
        config = {**asdict(self.config), "prog_it": self.prog_it, "last_prog_si": self.last_prog_si,
                  "first_prog": self.first_prog}
        return {"config": config, "var_wo_ddp": self.var.state_dict(), "var_opt": var_opt}

    def save_checkpoint(self, path, args: Optional[Dict] = None) -> None:
        """Write ``{"iter", "trainer", "args", "rng"}`` to ``path`` atomically (a temporary file, then a rename).
        The global RNG states (class dropout and drop-path draw from them) are saved so that a resumed run
        continues exactly. When distributed, only rank 0 writes."""
        if not is_writer(self.distributed):
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({"iter": self.it, "trainer": self.state_dict(), "args": args or {}, "rng": rng}, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path) -> Dict:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (weights-only load); returns its contents."""
        ckpt = read_checkpoint(path, self.device)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("trainer"), dict) or "iter" not in ckpt:
            raise ValueError(f"{path} is not a varcore VAR training checkpoint")
        state = ckpt["trainer"]
        for key, inner in (("var_wo_ddp", None), ("var_opt", "optimizer")):
            if not isinstance(state.get(key), dict) or (inner is not None and not isinstance(state[key].get(inner),
                                                                                            dict)):
                raise ValueError(f"{path} has no {key}{'.' + inner if inner else ''} state: it cannot resume "
                                 f"training (load the weights alone with varcore.checkpoints.load_var)")
        checked_iteration(ckpt["iter"], "iter", path)
        self.var.load_state_dict(state["var_wo_ddp"], strict=True)
        self.optimizer.load_state_dict(state["var_opt"]["optimizer"])
        if self.scaler is not None and state["var_opt"].get("scaler") is not None:
            self.scaler.load_state_dict(state["var_opt"]["scaler"])
        self.it = int(ckpt["iter"])
        config = state.get("config", {})
        self.prog_it = int(config.get("prog_it", 0))
        self.last_prog_si = int(config.get("last_prog_si", -1))
        self.first_prog = bool(config.get("first_prog", True))
        if self.distributed:  # the file holds rank 0's RNG only: give each rank its own stream
            reseed_per_rank(self.it)
        elif "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
            if torch.cuda.is_available() and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([t.cpu() for t in ckpt["rng"]["cuda"]])
        return ckpt


def check_distributed(distributed) -> bool:
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("distributed=True needs a torch.distributed process group (run under torchrun; see "
                         "varcore.train.distributed.setup)")
    return distributed


def is_writer(distributed: bool) -> bool:
    return not distributed or torch.distributed.get_rank() == 0


def reseed_per_rank(it: int) -> None:
    torch.manual_seed(it * 1_000_003 + torch.distributed.get_rank())


def batches_forever(loader: Iterable) -> Iterable:
    epoch = 0
    while True:
        yielded = False
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler reshuffles per epoch
            sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the data loader is empty")


def run_steps(trainer, loader: Iterable, step: Callable, ckpt_path: Optional[Path], save_every: int, progress: bool,
              args: Optional[Dict], desc: str) -> List[Dict[str, float]]:
    """The training loop of every trainer: ``step(batch)`` until ``trainer.config.max_iters``, a progress bar with
    the step's loss and accuracy (and lr when given), ``trainer.save_checkpoint(ckpt_path, args)`` every
    ``save_every`` steps and at the end (when ``ckpt_path`` is set). Returns the per-step metrics."""
    history: List[Dict[str, float]] = []
    bar = tqdm(total=trainer.config.max_iters, initial=trainer.it, disable=not progress, desc=desc, dynamic_ncols=True)
    for batch in batches_forever(loader):
        if trainer.it >= trainer.config.max_iters:
            break
        metrics = step(batch)
        history.append(metrics)
        bar.update(1)
        postfix = dict(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.1f}")
        if "lr" in metrics:
            postfix["lr"] = f"{metrics['lr']:.2e}"
        bar.set_postfix(**postfix)
        if ckpt_path is not None and save_every and trainer.it % save_every == 0:
            trainer.save_checkpoint(ckpt_path, args)
    bar.close()
    if ckpt_path is not None:
        trainer.save_checkpoint(ckpt_path, args)
    return history


def train(trainer: VARTrainer, loader: Iterable, out_dir=None, save_every: int = 0, progress: bool = True,
          args: Optional[Dict] = None) -> List[Dict[str, float]]:
    """Run ``trainer`` until ``config.max_iters`` on batches from ``loader`` and return the per-step metrics.

    Batches are ``(tokens (B, L) integer, labels)`` or ``(images (B, 3, H, W) float, labels)``. With ``out_dir``
    the state is saved to ``out_dir/ckpt-last.pth`` every ``save_every`` steps (0: only at the end).
    """
    patch_nums = trainer.var.patch_nums

    def step(batch):
        data, label_B = batch
        if data.is_floating_point():
            return trainer.train_step(label_B, img_B3HW=data)
        return trainer.train_step(label_B, idx_Bl=split_scales(data, patch_nums))

    ckpt_path = None if out_dir is None else Path(out_dir) / "ckpt-last.pth"
    return run_steps(trainer, loader, step, ckpt_path, save_every, progress, args, "train VAR")


def build_var_for_training(vae: VQVAE, depth: int, num_classes: int = 1000, width: Optional[int] = None,
                           heads: Optional[int] = None, shared_aln: bool = False, cond_drop_rate: float = 0.1,
                           init_adaln_gamma: float = 1e-3, drop_path_rate: Optional[float] = None) -> VAR:
    """A freshly initialised VAR on ``vae``'s device and scale schedule, with the official recipe's settings
    (width 64 * depth and ``depth`` heads unless given, drop-path 0.1 * depth / 24 unless given, L2-normalised
    attention)."""
    width = 64 * depth if width is None else width
    drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
    var = VAR(vae, num_classes=num_classes, depth=depth, embed_dim=width, num_heads=depth if heads is None else heads,
              drop_path_rate=drop_path_rate, norm_eps=1e-6, shared_aln=shared_aln, cond_drop_rate=cond_drop_rate,
              attn_l2_norm=True, patch_nums=vae.quantize.v_patch_nums)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=init_adaln_gamma, init_head=0.02, init_std=-1)
    return var.to(vae.quantize.embedding.weight.device)


# ---------------------------------------------------------------------- command line
def _parse_patch_nums(text: str) -> Tuple[int, ...]:
    if text.isdigit() and int(text) in PATCH_NUMS:
        return PATCH_NUMS[int(text)]
    try:
        return tuple(int(p) for p in text.split("_"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pn must be 256, 512, 1024 or a list like 1_2_3_4, got {text!r}")


def _parse_floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m varcore.train.var_trainer",
                                description="Train a VAR transformer on a frozen VQVAE (official recipe).")
    d = p.add_argument_group("data and model")
    d.add_argument("--vae", required=True, help="VQVAE checkpoint (e.g. vae_ch160v4096z32.pth)")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="image folder root/<class>/<image> (tokenised on the fly)")
    src.add_argument("--tokens", help="file with {'idx_BL': (N, L), 'labels': (N,)} token pyramids")
    d.add_argument("--pn", type=_parse_patch_nums, default=PATCH_NUMS[256],
                   help="scale schedule: 256, 512, 1024 or e.g. 1_2_3_4 (default 256)")
    d.add_argument("--depth", type=int, default=16)
    d.add_argument("--width", type=int, default=None, help="embedding width (default 64 * depth)")
    d.add_argument("--heads", type=int, default=None, help="attention heads (default depth)")
    d.add_argument("--num-classes", type=int, default=1000)
    d.add_argument("--saln", action="store_true", help="shared AdaLN (as the 512 px d36-s model)")
    d.add_argument("--init-var", default=None, help="start from these VAR weights (fine-tuning)")
    d.add_argument("--alng", type=finite_float, default=1e-3, help="AdaLN gamma init")
    o = p.add_argument_group("optimisation")
    o.add_argument("--iters", type=int, required=True, help="total optimisation steps")
    o.add_argument("--bs", type=int, default=64, help="global batch size (split over the torchrun ranks)")
    o.add_argument("--tblr", type=finite_float, default=1e-4, help="base lr per 256 samples (lr = tblr * bs / 256)")
    o.add_argument("--lr", type=finite_float, default=None, help="peak lr (overrides --tblr)")
    o.add_argument("--wd", type=finite_float, default=0.05, help="weight decay at the start")
    o.add_argument("--wde", type=finite_float, default=None, help="weight decay at the end (default --wd)")
    o.add_argument("--wp", type=int, default=None, help="warm-up steps (default iters / 50)")
    o.add_argument("--wp0", type=finite_float, default=0.005, help="lr fraction at the start of warm-up")
    o.add_argument("--wpe", type=finite_float, default=0.1, help="final lr fraction")
    o.add_argument("--sche", choices=SCHEDULES, default=None,
                   help="lr decay after warm-up (default lin0; lin<pg> with --pg, as the official train.py)")
    o.add_argument("--clip", type=finite_float, default=2.0, help="gradient-norm clip (0 disables)")
    o.add_argument("--ls", type=finite_float, default=0.0, help="label smoothing")
    o.add_argument("--scale-weights", type=_parse_floats, default=None,
                   help="comma-separated loss weight per scale (default: every token equal)")
    o.add_argument("--cond-drop", type=finite_float, default=0.1, help="class-dropout probability (for CFG)")
    o.add_argument("--drop-path", type=finite_float, default=None, help="drop-path rate (default 0.1 * depth / 24)")
    o.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast precision")
    o.add_argument("--pg", type=finite_float, default=0.0,
                   help="progressive training during the first fraction pg of the steps (0: off)")
    o.add_argument("--pg0", type=int, default=4, help="progressive training: the last scale of the first stage")
    o.add_argument("--pgwp", type=finite_float, default=None,
                   help="progressive training: warm-up steps of each newly added scale (default iters / 300)")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=out_dir_arg, required=True,
                   help="output folder (ckpt-last.pth; resumed from when present)")
    r.add_argument("--no-resume", action="store_true", help="ignore an existing ckpt-last.pth")
    r.add_argument("--save-every", type=int, default=1000, help="checkpoint interval in steps (0: end only)")
    r.add_argument("--device", type=device_arg, default=None,
                   help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    r.add_argument("--workers", type=int, default=2, help="data-loader workers")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    """Command-line entry point (also under torchrun); returns the per-step metrics of this run."""
    args = build_arg_parser().parse_args(argv)
    with _distributed.process_group(args.device) as env:
        return _main(args, env)


def _config_from_args(args) -> TrainConfig:
    return TrainConfig(
        max_iters=args.iters, lr=args.lr if args.lr is not None else args.tblr * args.bs / 256,
        weight_decay=args.wd, weight_decay_end=args.wde,
        warmup_iters=args.wp if args.wp is not None else args.iters // 50, wp0=args.wp0, wpe=args.wpe,
        schedule=args.sche, grad_clip=args.clip, label_smoothing=args.ls, scale_weights=args.scale_weights,
        amp=args.amp, pg=args.pg, pg0=args.pg0, pgwp=args.pgwp,
    )


def _main(args, env: "_distributed.DistEnv", make_trainer=None) -> List[Dict[str, float]]:
    """The run behind :func:`main`; ``make_trainer(vae, var, config, distributed)`` builds the trainer (default
    :class:`VARTrainer`; CoDe's entry point passes its drafter/refiner trainers)."""
    from varcore.checkpoints import load_vae, read_state_dict  # deferred: checkpoints imports the models

    torch.manual_seed(args.seed)
    device = env.device
    vae = load_vae(args.vae, device=device, v_patch_nums=args.pn)
    var = build_var_for_training(vae, depth=args.depth, num_classes=args.num_classes, width=args.width,
                                 heads=args.heads, shared_aln=args.saln, cond_drop_rate=args.cond_drop,
                                 init_adaln_gamma=args.alng, drop_path_rate=args.drop_path)
    if args.init_var:
        var.load_state_dict(read_state_dict(args.init_var, kind="var"), strict=True)
    if env.enabled:  # same initial weights everywhere (DDP broadcasts rank 0's), own dropout draws per rank
        torch.manual_seed(args.seed + env.rank)
    try:
        trainer = (make_trainer or VARTrainer)(vae, var, _config_from_args(args), distributed=env.enabled)
    except ValueError as e:  # a user's mistake on the command line: a message, not a traceback
        sys.exit(f"error: {e}")
    ckpt_path = Path(args.out) / "ckpt-last.pth"
    if ckpt_path.is_file() and not args.no_resume:
        trainer.load_checkpoint(ckpt_path)
        print(f"resumed from {ckpt_path} at step {trainer.it}", file=sys.stderr)

    if args.data:
        dataset = ImageFolder(args.data, reso=args.pn[-1] * vae.downsample, train=True)
    else:
        dataset = TokenPyramids(args.tokens)
    loader = _distributed.make_loader(dataset, args.bs, env, workers=args.workers, seed=args.seed)
    return train(trainer, loader, out_dir=args.out, save_every=args.save_every,
                 progress=not args.no_progress and env.is_main,
                 args={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
