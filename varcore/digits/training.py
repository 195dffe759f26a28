"""Training recipe of the bundled digits models (``varcore train-digits`` / ``python -m varcore.digits.training``).

Ten stages, each seeded from the recipe's seed, so a run is deterministic for a seed (same machine, same torch,
same number of threads) and any stage can be re-run alone with ``--parts`` (later stages load the tokenizers they
need from the output directory):

1. ``classifier``: the quality harness's digit CNN (cross-entropy, Adam);
2. ``vqvae``: VAR's multi-scale VQVAE (MSE reconstruction + VQ loss; the codebook starts from encoder features and
   dead codes are restarted from encoder features every ``restart_every`` steps);
3. ``var-drafter`` and 4. ``var-refiner``: VARs trained with :class:`varcore.train.VARTrainer` on tokens of
   augmented images (class dropout 0.1 for classifier-free guidance);
5. ``vq``: LlamaGen's single-scale tokenizer (same losses and code restarts);
6. ``gpt-par`` and 7. ``gpt-raster``: the GPTs trained with :class:`varcore.train.gpt_trainer.GPTTrainer`;
8. ``vqvae8``: the multi-scale VQVAE of the 8x8-latent family (as ``vqvae``), 9. ``var8-drafter`` and
   10. ``var8-refiner``: VARs on its six scales (as 3. and 4.).

A stage's seeds depend on its position in :data:`STAGES` only; every VAR or GPT stage reads its tokenizer back
from the output directory.

Every stage trains on the fixed train split with random shifts of up to one pixel, and writes
``<stage>.safetensors`` (float16 weights, architecture and final metrics in the metadata) into ``--out``
(default ``./digits-weights``); only ``--into-package`` replaces the weights bundled in the installed package.
"""
import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from varcore.argtypes import out_dir_arg, positive_float, positive_int, seed_arg
from varcore.digits.data import augment, load_digits
from varcore.digits.recipe import VAR_TOKENIZER, WEIGHTS_DIR, build, load_weights, save_weights, weights_path
from varcore.train.var_trainer import backward_and_step

__all__ = ["DigitsRecipe", "STAGES", "train_digits", "main"]

DEFAULT_OUT = "digits-weights"
# new stages go last: a stage's seeds depend on its position, so appending keeps the others' weights
STAGES = ("classifier", "vqvae", "var-drafter", "var-refiner", "vq", "gpt-par", "gpt-raster", "vqvae8",
          "var8-drafter", "var8-refiner")


@dataclass
class DigitsRecipe:
    """Iterations, batch size and learning rates of each stage; ``seed`` seeds every stage."""

    seed: int = 0
    batch_size: int = 64
    tokenizer_batch_size: int = 32
    token_copies: int = 10
    classifier_iters: int = 400
    vqvae_iters: int = 600
    vq_iters: int = 600
    var_iters: int = 1200
    refiner_iters: int = 1200
    gpt_iters: int = 2100
    vqvae8_iters: int = 1200
    var8_iters: int = 2000
    refiner8_iters: int = 2000
    classifier_lr: float = 2e-3
    tokenizer_lr: float = 2e-3
    var_lr: float = 1e-3
    gpt_lr: float = 2e-3
    restart_every: int = 100

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_iters") or f.name in ("batch_size", "tokenizer_batch_size", "token_copies",
                                                       "restart_every"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{f.name} must be a positive int, got {value!r}")
            elif f.name.endswith("_lr") and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value!r}")

    @classmethod
    def tiny(cls, seed: int = 0) -> "DigitsRecipe":
        """A few steps per stage: for tests and smoke runs (the models are not useful)."""
        return cls(seed=seed, batch_size=16, tokenizer_batch_size=8, token_copies=1, classifier_iters=3,
                   vqvae_iters=3, vq_iters=3, var_iters=3, refiner_iters=3, gpt_iters=3, vqvae8_iters=3, var8_iters=3,
                   refiner8_iters=3, restart_every=2)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of shuffled epochs over n items, ``batch_size`` at a time, forever."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=True)


def _mean_tail(values: List[float], n: int = 50) -> float:
    tail = values[-n:]
    return sum(tail) / max(len(tail), 1)


# ------------------------------------------------------------------------------------------------ classifier
def train_classifier(recipe: DigitsRecipe, gen: torch.Generator, progress: bool):
    x, y = load_digits("train")
    model = build("classifier")
    opt = torch.optim.Adam(model.parameters(), lr=recipe.classifier_lr)
    batches = _batches(len(y), recipe.batch_size, gen)
    losses = []
    bar = _bar(recipe.classifier_iters, "classifier", progress)
    model.train()
    for it in range(recipe.classifier_iters):
        idx = next(batches)
        loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
        backward_and_step(loss, model.parameters(), opt, None, 0.0)  # stops on a non-finite loss
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    xt, yt = load_digits("test")
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return model, {"train_loss": _mean_tail(losses), "test_accuracy": acc}


# ------------------------------------------------------------------------------------------------ tokenizers
@torch.no_grad()
def _restart_codes(codebook: torch.Tensor, dead: torch.Tensor, feats: torch.Tensor, gen: torch.Generator) -> int:
    """Overwrite the ``dead`` rows of ``codebook`` with random rows of ``feats`` (N, C); returns how many."""
    n_dead = int(dead.sum())
    if n_dead:
        pick = torch.randint(0, feats.shape[0], (n_dead,), generator=gen)
        codebook[dead] = feats[pick].to(codebook.dtype)
    return n_dead


def _train_tokenizer(model, encode_feats: Callable, step_loss: Callable, codebook: torch.Tensor, iters: int,
                     recipe: DigitsRecipe, gen: torch.Generator, desc: str, progress: bool) -> Dict[str, float]:
    """Shared loop of both tokenizers. ``encode_feats(x)`` gives (N, C) encoder features (codebook space),
    ``step_loss(x)`` gives (loss, reconstruction, code indices (N,))."""
    x, _ = load_digits("train")
    opt = torch.optim.Adam(model.parameters(), lr=recipe.tokenizer_lr, betas=(0.9, 0.99))
    batches = _batches(x.shape[0], recipe.tokenizer_batch_size, gen)
    V = codebook.shape[0]
    hits = torch.zeros(V)
    losses, restarted = [], 0
    model.train()
    with torch.no_grad():  # start the codebook on data: random encoder features of a batch
        _restart_codes(codebook, torch.ones(V, dtype=torch.bool), encode_feats(x[next(batches)]), gen)
    bar = _bar(iters, desc, progress)
    for it in range(1, iters + 1):
        xb = augment(x[next(batches)], gen)
        loss, _, idx = step_loss(xb)
        backward_and_step(loss, model.parameters(), opt, None, 0.0)  # stops on a non-finite loss
        hits += idx.bincount(minlength=V).float()
        losses.append(loss.item())
        if it % recipe.restart_every == 0 and it < 0.8 * iters:  # leave the last steps to settle
            with torch.no_grad():
                restarted += _restart_codes(codebook, hits == 0, encode_feats(xb), gen)
            hits.zero_()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model.eval()
    xt, _ = load_digits("test")
    with torch.no_grad():
        _, recon, idx = step_loss(xt)
    return {"train_loss": _mean_tail(losses), "test_mse": F.mse_loss(recon, xt).item(),
            "test_code_usage": idx.unique().numel() / V, "codes_restarted": restarted}


def train_vqvae(part: str, recipe: DigitsRecipe, gen: torch.Generator, progress: bool):
    """VAR's multi-scale VQVAE ``part`` ('vqvae' or 'vqvae8')."""
    vae = build(part)
    q = vae.quantize

    def feats(x):
        f = vae.quant_conv(vae.encoder(x))
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])

    def step_loss(x):
        f = vae.quant_conv(vae.encoder(x))
        f_hat, _, vq_loss = q(f)
        recon = vae.decoder(vae.post_quant_conv(f_hat))
        idx = q.f_to_idxBl_or_fhat(f.detach(), to_fhat=False)
        return F.mse_loss(recon, x) + vq_loss, recon, torch.cat(idx, dim=1).flatten()

    iters = recipe.vqvae_iters if part == "vqvae" else recipe.vqvae8_iters
    metrics = _train_tokenizer(vae, feats, step_loss, q.embedding.weight.data, iters, recipe, gen, part, progress)
    vae.requires_grad_(False)
    return vae, metrics


def train_vq(recipe: DigitsRecipe, gen: torch.Generator, progress: bool):
    vq = build("vq")

    def feats(x):
        z = vq.quant_conv(vq.encoder(x))
        return F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)

    def step_loss(x):
        quant, (vq_loss, commit_loss, _, _), (_, _, idx) = vq.encode(x)
        recon = vq.decode(quant)
        extra = 0.0 if vq_loss is None else vq_loss + commit_loss
        return F.mse_loss(recon, x) + extra, recon, idx

    metrics = _train_tokenizer(vq, feats, step_loss, vq.quantize.embedding.weight.data, recipe.vq_iters, recipe,
                               gen, "vq", progress)
    vq.requires_grad_(False)
    return vq, metrics


# ------------------------------------------------------------------------------------------------ generators
@torch.no_grad()
def _token_bank(tokenize: Callable, recipe: DigitsRecipe, gen: torch.Generator):
    """Tokens of ``token_copies`` copies of the train split (the first as is, the others randomly shifted), so
    the frozen tokenizer runs once instead of at every step. Returns (tokens (N, L), labels (N,))."""
    x, y = load_digits("train")
    tokens = []
    for c in range(recipe.token_copies):
        xc = x if c == 0 else augment(x, gen)
        tokens.extend(tokenize(chunk) for chunk in xc.split(256))
    return torch.cat(tokens), y.repeat(recipe.token_copies)


def _fit(trainer, step: Callable, tokens: torch.Tensor, labels: torch.Tensor, iters: int, recipe: DigitsRecipe,
         gen: torch.Generator, desc: str, progress: bool) -> List[Dict[str, float]]:
    """``iters`` trainer steps ``step(labels, tokens)`` over shuffled batches of the token bank."""
    batches = _batches(len(labels), recipe.batch_size, gen)
    history = []
    bar = _bar(iters, desc, progress)
    for _ in range(iters):
        idx = next(batches)
        m = step(labels[idx], tokens[idx])
        history.append(m)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.1f}")
    bar.close()
    return history


def _config(iters: int, lr: float, grad_clip: float):
    from varcore.train.var_trainer import TrainConfig

    return TrainConfig(max_iters=iters, lr=lr, warmup_iters=min(100, iters // 10), weight_decay=0.05,
                       schedule="lin0", wpe=0.05, grad_clip=grad_clip)


def train_var(part: str, vae, recipe: DigitsRecipe, gen: torch.Generator, progress: bool):
    from varcore.train.data import split_scales
    from varcore.train.var_trainer import VARTrainer

    iters = {"var-drafter": recipe.var_iters, "var-refiner": recipe.refiner_iters, "var8-drafter": recipe.var8_iters,
             "var8-refiner": recipe.refiner8_iters}[part]
    var = build(part, vae=vae)
    trainer = VARTrainer(vae, var, _config(iters, recipe.var_lr, grad_clip=2.0))
    patch_nums = var.patch_nums

    def tokenize(x):
        return torch.cat(vae.img_to_idxBl(x), dim=1)

    tokens, labels = _token_bank(tokenize, recipe, gen)
    history = _fit(trainer, lambda y, t: trainer.train_step(y, idx_Bl=split_scales(t, patch_nums)), tokens, labels,
                   iters, recipe, gen, part, progress)
    xt, yt = load_digits("test")
    ev = trainer.eval_step(yt, img_B3HW=xt)
    var.eval().requires_grad_(False)
    return var, {"train_loss": _mean_tail([m["loss"] for m in history]), "test_loss": ev["loss"],
                 "test_token_accuracy": ev["acc"] / 100}


def train_gpt(part: str, vq, recipe: DigitsRecipe, gen: torch.Generator, progress: bool):
    from varcore.train.gpt_trainer import GPTTrainer

    gpt = build(part)
    trainer = GPTTrainer(gpt, _config(recipe.gpt_iters, recipe.gpt_lr, grad_clip=1.0))
    tokens, labels = _token_bank(lambda x: vq.img_to_idx(x).flatten(1), recipe, gen)
    history = _fit(trainer, trainer.train_step, tokens, labels, recipe.gpt_iters, recipe, gen, part, progress)
    xt, yt = load_digits("test")
    ev = trainer.eval_step(yt, vq.img_to_idx(xt))
    gpt.eval().requires_grad_(False)
    return gpt, {"train_loss": _mean_tail([m["loss"] for m in history]), "test_loss": ev["loss"],
                 "test_token_accuracy": ev["acc"] / 100}


# ------------------------------------------------------------------------------------------------ driver
def _stage_generator(recipe: DigitsRecipe, stage: str) -> torch.Generator:
    """Seed the global RNG (weight init, dropout) and return the data generator of ``stage``: both depend only on
    the recipe seed and the stage, so a stage gives the same weights whether it runs alone or after others."""
    offset = STAGES.index(stage)
    torch.manual_seed(recipe.seed * 1000 + offset)
    return torch.Generator().manual_seed(recipe.seed * 1000 + 500 + offset)


def _tokenizer(part: str, out_dir: Path):
    if not weights_path(part, out_dir).is_file():
        raise FileNotFoundError(f"the {part!r} tokenizer is not in {out_dir}: add the {part!r} stage to the parts, "
                                f"or copy {weights_path(part)} (the bundled one) there first")
    return load_weights(part, root=out_dir)


def train_digits(recipe: Optional[DigitsRecipe] = None, out_dir=None, parts: Optional[Sequence[str]] = None,
                 progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Run the recipe (all stages, or ``parts``) and write the weights to ``out_dir`` (required; pass
    :data:`varcore.digits.recipe.WEIGHTS_DIR` to replace the bundled weights). A VAR or GPT stage reads its
    tokenizer from ``out_dir``. Returns each stage's metrics (also stored in the weights' metadata)."""
    recipe = DigitsRecipe() if recipe is None else recipe
    if not isinstance(recipe, DigitsRecipe):
        raise TypeError(f"recipe must be a DigitsRecipe, got {type(recipe).__name__}")
    parts = list(STAGES if parts is None else parts)
    unknown = [p for p in parts if p not in STAGES]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {STAGES}, got {parts}")
    if out_dir is None:
        raise ValueError(f"out_dir is required (the bundled weights are replaced only when it is {WEIGHTS_DIR})")
    out_dir = Path(out_dir)
    results: Dict[str, Dict[str, float]] = {}
    for stage in STAGES:
        if stage not in parts:
            continue
        gen = _stage_generator(recipe, stage)
        t0 = time.perf_counter()
        if stage == "classifier":
            model, metrics = train_classifier(recipe, gen, progress)
        elif stage in ("vqvae", "vqvae8"):
            model, metrics = train_vqvae(stage, recipe, gen, progress)
        elif stage in VAR_TOKENIZER:
            # every stage reads its tokenizer back from the (float16) file, also right after training it or after
            # another stage used it: building the module to load into draws from the global RNG, so a stage gives
            # the same weights whether it runs alone or after other stages
            model, metrics = train_var(stage, _tokenizer(VAR_TOKENIZER[stage], out_dir), recipe, gen, progress)
        elif stage == "vq":
            model, metrics = train_vq(recipe, gen, progress)
        else:
            model, metrics = train_gpt(stage, _tokenizer("vq", out_dir), recipe, gen, progress)
        metrics = {**metrics, "seconds": round(time.perf_counter() - t0, 1), "seed": recipe.seed,
                   "recipe": dataclasses.asdict(recipe)}
        save_weights(stage, model, root=out_dir, info=metrics)
        results[stage] = metrics
    return results


def build_arg_parser(prog: str = "python -m varcore.digits.training") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train the bundled digits models (VQVAEs, VAR drafters and "
                                "refiners, VQ tokenizer, PAR and raster GPTs, harness classifier) on this CPU.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = DigitsRecipe()
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=out_dir_arg, default=DEFAULT_OUT,
                       help=f"output directory (default: ./{DEFAULT_OUT}; load it with "
                            f"varcore.digits.load_bundled(name, weights_root=DIR))")
    where.add_argument("--into-package", action="store_true",
                       help=f"replace the bundled weights in the installed package ({WEIGHTS_DIR})")
    p.add_argument("--parts", nargs="+", choices=STAGES, default=None, metavar="STAGE",
                   help=f"stages to run (default: all): {', '.join(STAGES)}")
    p.add_argument("--seed", type=seed_arg, default=defaults.seed)
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                   help="images per training step (--tiny uses its own)")
    p.add_argument("--scale-iters", type=positive_float, default=1.0,
                   help="multiply every stage's iteration count (e.g. 0.1 for a quick smoke run)")
    p.add_argument("--tiny", action="store_true", help="a few steps per stage (tests; the models are useless)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def recipe_from_args(args: argparse.Namespace) -> DigitsRecipe:
    if args.tiny:
        return DigitsRecipe.tiny(seed=args.seed)
    if not args.scale_iters > 0:
        raise ValueError(f"--scale-iters must be > 0, got {args.scale_iters}")
    base = DigitsRecipe(seed=args.seed, batch_size=args.batch_size)
    iters = {f.name: max(1, round(getattr(base, f.name) * args.scale_iters))
             for f in dataclasses.fields(base) if f.name.endswith("_iters")}
    return dataclasses.replace(base, **iters)


def run(args: argparse.Namespace) -> int:
    out = WEIGHTS_DIR if args.into_package else args.out
    results = train_digits(recipe_from_args(args), out_dir=out, parts=args.parts,
                           progress=not args.no_progress)
    for stage, metrics in results.items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{stage}: {shown}")
    return 0


def main(argv=None) -> int:
    return run(build_arg_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
