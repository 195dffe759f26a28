"""Training of LlamaGen/PAR GPTs on pre-extracted VQ-16 codes, sharing the VAR trainer's pieces (``TrainConfig``,
AdamW parameter groups, lr/wd schedules, autocast and loss scaling, the batch loop).

Recipe of PAR's ``train_c2i.py`` (spec B.6): codes in raster order are reordered into PAR order (the official FSDP
script forgets this; here it cannot be skipped), the model is called as ``model(cond_idx=labels,
idx=codes[:, :-1], targets=codes)`` with the group-causal mask, token cross-entropy, AdamW lr 1e-4, betas
(0.9, 0.95), weight decay 0.05 on matrices, gradient clipping at 1, constant lr; class, token, residual and FFN
dropout 0.1 come from the model. Checkpoints are ``{"model", "optimizer", "steps", "args"}`` as LlamaGen writes
them, so ``varcore.checkpoints.load_gpt`` and the official samplers read them.

Command line::

    python -m varcore.train.gpt_trainer --tokens codes.pt --model GPT-B --M 2 --grid 24 --bs 64 \\
        --iters 100000 --out runs/par-b-4x
"""
import argparse
import math
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from varcore.argtypes import device_arg, finite_float, out_dir_arg
from varcore.models.gpt import GPT_models, Transformer
from varcore.ops.par_order import par_gather
from varcore.ops.quant import check_idx
from varcore.train import distributed as _distributed
from varcore.train.data import TokenPyramids
from varcore.train.losses import token_accuracy, token_accuracy_tensor
from varcore.train.schedule import SCHEDULES
from varcore.train.var_trainer import (
    AMP_DTYPES, TrainConfig, check_distributed, is_writer, reseed_per_rank, apply_schedule,
    backward_and_step, checked_iteration, host_metrics, make_optimizer, raise_if_loss_nonfinite, read_checkpoint,
    run_steps,
)

__all__ = ["GPTTrainer", "train", "to_par_order", "main"]


def to_par_order(codes: torch.Tensor, M: int) -> torch.Tensor:
    """Raster codes (B, G, G) or (B, G*G) -> (B, G*G) in PAR order for M x M regions."""
    if codes.ndim == 2:
        G = math.isqrt(codes.shape[1])
        if G * G != codes.shape[1]:
            raise ValueError(f"codes (B, L) must have a square L, got {tuple(codes.shape)}")
        codes = codes.view(codes.shape[0], G, G)
    if codes.ndim != 3:
        raise ValueError(f"codes must be (B, G, G) or (B, G*G), got {tuple(codes.shape)}")
    return par_gather(codes.contiguous(), M)


class GPTTrainer:
    """Trains ``model`` with ``config`` (a :class:`varcore.train.var_trainer.TrainConfig`; ``scale_weights`` and
    ``label_smoothing`` must be unset). ``distributed=True``: DistributedDataParallel, as for
    :class:`~varcore.train.var_trainer.VARTrainer`."""

    def __init__(self, model: Transformer, config: TrainConfig, distributed: bool = False):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a varcore.models.gpt.Transformer, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.scale_weights is not None or config.label_smoothing:
            raise ValueError("scale_weights and label_smoothing are VAR options; leave them unset for a GPT")
        self.model, self.config = model, config
        self.device = model.tok_embeddings.weight.device
        self.distributed = check_distributed(distributed)
        self.net = _distributed.wrap_ddp(model) if distributed else model  # what the forward pass runs through
        self.optimizer, self.amp_dtype, self.scaler = make_optimizer(model, config, self.device)
        self.it = 0

    def _apply_schedule(self) -> float:
        return apply_schedule(self.optimizer, self.config, self.it)

    def _loss(self, labels: torch.Tensor, codes: torch.Tensor, net=None):
        check_idx(codes, self.model.config.vocab_size, "codes")
        z = to_par_order(codes.to(self.device).long(), self.model.M)
        if z.shape[1] != self.model.block_size:
            raise ValueError(f"codes hold {z.shape[1]} tokens, the model expects block_size {self.model.block_size}")
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, loss = (net or self.model)(idx=z[:, :-1], cond_idx=labels.to(self.device).long(), targets=z)
        return logits, loss, z

    def train_step(self, labels: torch.Tensor, codes: torch.Tensor) -> Dict[str, float]:
        """One optimisation step on raster ``codes`` (B, G, G) or (B, G*G); returns loss, accuracy (%), gradient
        norm and lr. A non-finite loss raises a FloatingPointError, the weights unchanged."""
        metrics = host_metrics(self.step(labels, codes))
        raise_if_loss_nonfinite(metrics["loss"], skipped=True)
        return metrics

    def step(self, labels: torch.Tensor, codes: torch.Tensor) -> Dict:
        """:meth:`train_step` without a host synchronisation on an accelerator (see :meth:`VARTrainer.step`)."""
        lr = self._apply_schedule()
        self.model.train()
        logits, loss, z = self._loss(labels, codes, self.net)
        grad_norm = backward_and_step(loss, self.model.parameters(), self.optimizer, self.scaler,
                                      self.config.grad_clip)
        self.it += 1
        metrics = {"loss": loss.detach(), "acc": token_accuracy_tensor(logits, z)}
        if self.distributed:
            metrics = _distributed.mean_over_ranks(metrics, self.device)
        return {**metrics, "grad_norm": grad_norm, "lr": lr}

    @torch.no_grad()
    def eval_step(self, labels: torch.Tensor, codes: torch.Tensor) -> Dict[str, float]:
        """Loss and accuracy in eval mode (no dropout), without updating anything."""
        was_training = self.model.training
        self.model.eval()
        try:
            logits, loss, z = self._loss(labels, codes)
        finally:
            self.model.train(was_training)
        return {"loss": loss.item(), "acc": token_accuracy(logits, z)}

    def save_checkpoint(self, path, args: Optional[Dict] = None) -> None:
        """Write ``{"model", "optimizer", "steps", "args", "rng"}`` atomically (LlamaGen's layout plus RNG state);
        when distributed, only rank 0 writes."""
        if not is_writer(self.distributed):
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.it,
                    "args": args or {}, "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path) -> Dict:
        """Resume from :meth:`save_checkpoint` output (weights-only load); returns its contents."""
        ckpt = read_checkpoint(path, self.device)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "steps" not in ckpt:
            raise ValueError(f"{path} is not a varcore GPT training checkpoint")
        if not isinstance(ckpt.get("optimizer"), dict):
            raise ValueError(f"{path} has no optimizer state: it cannot resume training (load the weights alone "
                             f"with varcore.checkpoints.load_gpt)")
        checked_iteration(ckpt["steps"], "steps", path)
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.it = int(ckpt["steps"])
        if self.distributed:  # the file holds rank 0's RNG only: give each rank its own stream
            reseed_per_rank(self.it)
        elif "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"].cpu())
        return ckpt


def train(trainer: GPTTrainer, loader: Iterable, out_dir=None, save_every: int = 0, progress: bool = True,
          args: Optional[Dict] = None) -> List[Dict[str, float]]:
    """Run ``trainer`` to ``config.max_iters`` on ``(codes, labels)`` batches; returns the per-step metrics.
    With ``out_dir`` the state goes to ``out_dir/ckpt-last.pt`` every ``save_every`` steps and at the end."""
    ckpt_path = None if out_dir is None else Path(out_dir) / "ckpt-last.pt"
    return run_steps(trainer, loader, lambda batch: trainer.train_step(batch[1], batch[0]), ckpt_path, save_every,
                     progress, args, "train GPT")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m varcore.train.gpt_trainer",
                                description="Train a PAR (or LlamaGen, --M 1) GPT on pre-extracted VQ codes.")
    d = p.add_argument_group("data and model")
    d.add_argument("--tokens", required=True,
                   help="torch.save'd {'idx_BL': (N, G*G) raster codes, 'labels': (N,)}")
    d.add_argument("--model", choices=sorted(GPT_models), default="GPT-B")
    d.add_argument("--M", type=int, default=2, help="regions per side: 2 for PAR-4x, 4 for 16x, 1 for raster")
    d.add_argument("--grid", type=int, default=24, help="token grid side (24 for 384 px with VQ-16)")
    d.add_argument("--vocab-size", type=int, default=16384)
    d.add_argument("--num-classes", type=int, default=1000)
    d.add_argument("--dropout", type=finite_float, default=0.1, help="token, residual and FFN dropout")
    d.add_argument("--class-dropout", type=finite_float, default=0.1, help="class-label dropout (for CFG)")
    d.add_argument("--init-gpt", default=None, help="start from these weights (fine-tuning)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--iters", type=int, required=True)
    o.add_argument("--bs", type=int, default=64, help="global batch size (split over the torchrun ranks)")
    o.add_argument("--lr", type=finite_float, default=1e-4)
    o.add_argument("--wd", type=finite_float, default=0.05)
    o.add_argument("--wp", type=int, default=0, help="warm-up steps")
    o.add_argument("--wpe", type=finite_float, default=1.0, help="final lr fraction (1: constant lr, as official)")
    o.add_argument("--sche", choices=SCHEDULES, default="lin0")
    o.add_argument("--clip", type=finite_float, default=1.0)
    o.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=out_dir_arg, required=True,
                   help="output folder (ckpt-last.pt; resumed from when present)")
    r.add_argument("--no-resume", action="store_true")
    r.add_argument("--save-every", type=int, default=1000)
    r.add_argument("--device", type=device_arg, default=None,
                   help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    """Command-line entry point (also under torchrun); returns the per-step metrics of this run."""
    args = build_arg_parser().parse_args(argv)
    with _distributed.process_group(args.device) as env:
        return _main(args, env)


def _main(args, env: "_distributed.DistEnv") -> List[Dict[str, float]]:
    from varcore.checkpoints import gpt_state_dict

    torch.manual_seed(args.seed)
    model = GPT_models[args.model](
        vocab_size=args.vocab_size, block_size=args.grid ** 2, num_classes=args.num_classes,
        spe_token_num=args.M ** 2 - 1, ar_token_num=args.M ** 2, token_dropout_p=args.dropout,
        resid_dropout_p=args.dropout, ffn_dropout_p=args.dropout, class_dropout_prob=args.class_dropout,
    ).to(env.device)
    if args.init_gpt:
        model.load_state_dict(gpt_state_dict(args.init_gpt), strict=True)
    if env.enabled:  # same initial weights everywhere (DDP broadcasts rank 0's), own dropout draws per rank
        torch.manual_seed(args.seed + env.rank)
    config = TrainConfig(max_iters=args.iters, lr=args.lr, weight_decay=args.wd, warmup_iters=args.wp, wpe=args.wpe,
                         schedule=args.sche, grad_clip=args.clip, amp=args.amp)
    trainer = GPTTrainer(model, config, distributed=env.enabled)
    ckpt_path = Path(args.out) / "ckpt-last.pt"
    if ckpt_path.is_file() and not args.no_resume:
        trainer.load_checkpoint(ckpt_path)
        print(f"resumed from {ckpt_path} at step {trainer.it}", file=sys.stderr)
    dataset = TokenPyramids(args.tokens)
    loader = _distributed.make_loader(dataset, args.bs, env, workers=args.workers, seed=args.seed)
    return train(trainer, loader, out_dir=args.out, save_every=args.save_every,
                 progress=not args.no_progress and env.is_main, args=vars(args))


if __name__ == "__main__":
    main()
