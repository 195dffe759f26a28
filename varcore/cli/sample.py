"""varcore sample: images from a bundled digits model or official checkpoints, as a PNG grid (and an .npz).

The grid has one row per seed and one column per class. Row s is drawn in calls of at most --batch-size images;
call j of seed s is seeded with s + 1000003 * j (one call per row whenever --batch-size is at least the number of
classes, the default case), so the same command always gives the same images.

--npz writes the layout of OpenAI's ADM evaluator (guided-diffusion/evaluations) used for FID: arr_0 uint8
(N, H, W, 3) and arr_1 int64 labels (N,), rows in grid order.
"""
import argparse
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch
from tqdm import tqdm

from varcore.argtypes import device_arg, finite_float, image_path_arg, npz_path_arg, positive_int, seed_arg
from varcore.sampling.rng import seeded_generator

__all__ = ["add_parser", "run", "make_grid", "to_uint8"]

CALL_SEED_STRIDE = 1000003
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}


def add_parser(sub) -> argparse.ArgumentParser:
    from varcore.digits import bundled_names

    p = sub.add_parser("sample", help="sample images to a PNG grid (bundled digits models or official checkpoints)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (a bundled name, or official checkpoints by path)")
    m.add_argument("--model", default="digits-var", choices=bundled_names(),
                   help="bundled digits model (default: digits-var); ignored with --var or --gpt")
    m.add_argument("--var", metavar="PATH", help="official VAR checkpoint (var_d16.pth ...); needs --vae")
    m.add_argument("--vae", metavar="PATH", help="official VAR VQVAE checkpoint (vae_ch160v4096z32.pth)")
    m.add_argument("--gpt", metavar="PATH", help="official LlamaGen c2i_*.pt or PAR-*.pt checkpoint; needs --vq")
    m.add_argument("--vq", metavar="PATH", help="LlamaGen VQ-16 tokenizer (vq_ds16_c2i.pt)")
    m.add_argument("--grid-size", type=int, default=24,
                   help="GPT token grid side (24 for the 384 px models, 16 for 256 px; default 24)")
    s = p.add_argument_group("sampling")
    s.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class labels, one grid column each (default: 0..9)")
    s.add_argument("--seeds", type=seed_arg, nargs="+", default=[0, 1, 2, 3], help="seeds, one grid row each")
    s.add_argument("--cfg", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: the bundled model's; 1.5 for checkpoints)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    s.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus filtering mass in (0, 1] (1: off)")
    s.add_argument("--accel", metavar="KEY=VALUE[,KEY=VALUE...]", default=None,
                   help="training-free accelerators in varcore eval --accel's grammar without the model, e.g. "
                        "prune=-1:0.5,cfg_skip=1,draw=inverse_cdf (VAR, CoDe) or sjd=8 (GPT)")
    s.add_argument("--batch-size", type=positive_int, default=64, help="images per sampler call (default 64)")
    s.add_argument("--device", type=device_arg, default="cpu", help="torch device (default cpu)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="compute dtype of the VAR and CoDe samplers (default fp32: the official tokens); auto: bf16 "
                        "where a GEMM measured on the device is faster in it, else fp32; GPTs sample in fp32")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=image_path_arg, default="samples.png", help="PNG grid path (default samples.png)")
    o.add_argument("--scale", type=int, default=None,
                   help="integer upscaling of the grid (default: 4 for images under 64 px, else 1)")
    o.add_argument("--npz", type=npz_path_arg, metavar="PATH",
                   help="also write the images in the ADM evaluator's .npz layout")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3) (x * 255, truncated, as the official VAR evaluation)."""
    return images01.mul(255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, rows: int, cols: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """uint8 (rows * cols, H, W, 3) in row-major order -> one uint8 image with ``pad`` black pixels between cells,
    every pixel repeated ``scale`` times."""
    n, H, W, _ = images.shape
    if n != rows * cols:
        raise ValueError(f"expected rows * cols = {rows * cols} images, got {n}")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        H, W = H * scale, W * scale
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = images[i]
    return grid


def _official_sampler(args) -> Tuple[Callable, int, str]:
    """(sample(labels, seed, cfg) -> images in [0, 1], number of classes, description) for checkpoints."""
    from varcore import checkpoints
    from varcore.digits.accel import accel_options

    if args.var:
        if not args.vae:
            raise ValueError("--var needs --vae (the VQVAE checkpoint)")
        from varcore.sampling.var import VARSampler

        state = checkpoints.read_state_dict(args.var, kind="var")
        patch_nums = checkpoints.infer_var_kwargs(state)["patch_nums"]
        vae = checkpoints.load_vae(args.vae, device=args.device, v_patch_nums=patch_nums)
        var = checkpoints.load_var(state, vae, device=args.device)
        sampler = VARSampler(var, vae, dtype=DTYPES[args.dtype])
        accel = accel_options(args.accel, "var", len(patch_nums))

        def sample(labels, seed, cfg):
            return sampler.sample(labels.shape[0], labels, g_seed=seed, cfg=cfg, top_k=args.top_k,
                                  top_p=0.0 if args.top_p >= 1 else args.top_p, **accel)

        return sample, var.num_classes, f"VAR {Path(args.var).name}"
    if not args.vq:
        raise ValueError("--gpt needs --vq (the VQ-16 tokenizer checkpoint)")
    from varcore.sampling.par import PARSampler

    if args.dtype not in ("fp32", "auto"):
        raise ValueError(f"--dtype {args.dtype} applies to VAR and CoDe models; GPTs sample in fp32")
    if args.grid_size < 1:
        raise ValueError(f"--grid-size must be >= 1, got {args.grid_size}")
    gpt = checkpoints.load_gpt(args.gpt, block_size=args.grid_size ** 2, device=args.device)
    vq = checkpoints.load_vq16(args.vq, device=args.device)
    sampler = PARSampler(gpt, vq)
    accel = accel_options(args.accel, "gpt", sampler.L)

    def sample(labels, seed, cfg):
        gen = seeded_generator(seed, args.device)
        img = sampler.sample(labels, cfg_scale=cfg, top_k=args.top_k, top_p=args.top_p, generator=gen, **accel)
        return img.clamp(-1, 1).add(1).mul(0.5)

    return sample, gpt.num_classes, f"GPT {Path(args.gpt).name} (M={gpt.M})"


def _bundled_sampler(args) -> Tuple[Callable, int, str]:
    from varcore.digits import NUM_CLASSES, DigitsSampler
    from varcore.digits.accel import accel_options

    sampler = DigitsSampler(args.model, device=args.device, dtype=DTYPES[args.dtype])
    accel = accel_options(args.accel, sampler.info.family, sampler.scales or sampler.steps)

    def sample(labels, seed, cfg):
        return sampler.sample(labels, seed=seed, cfg=cfg, top_k=args.top_k, top_p=args.top_p, **accel)

    return sample, NUM_CLASSES, f"{args.model} ({sampler.decoding_for(accel)}, {sampler.steps} forward passes)"


def _check_args(args) -> None:
    if args.var and args.gpt:
        raise ValueError("pass either --var or --gpt, not both")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.cfg is not None and args.cfg < 0:
        raise ValueError(f"--cfg must be >= 0, got {args.cfg}")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")


def sample_grid(args) -> Tuple[torch.Tensor, torch.Tensor, List[int], str]:
    """(images (rows * cols, 3, H, W) in [0, 1], labels, classes, description) for parsed ``args``."""
    _check_args(args)
    official = bool(args.var or args.gpt)
    sample, num_classes, what = _official_sampler(args) if official else _bundled_sampler(args)
    classes = list(range(min(num_classes, 10))) if args.classes is None else list(args.classes)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes must be in [0, {num_classes}) for this model, got {bad}")
    cfg = 1.5 if official and args.cfg is None else args.cfg
    images, labels = [], []
    calls = [(s, j, classes[i:i + args.batch_size]) for s in args.seeds
             for j, i in enumerate(range(0, len(classes), args.batch_size))]
    for seed, j, chunk in tqdm(calls, desc="sample", disable=args.no_progress, dynamic_ncols=True):
        lab = torch.tensor(chunk, device=args.device)
        with torch.no_grad():
            images.append(sample(lab, (seed + CALL_SEED_STRIDE * j) % 2 ** 64, cfg).float().cpu())
        labels.append(lab.cpu())
    return torch.cat(images), torch.cat(labels), classes, what


def run(args) -> int:
    from PIL import Image

    images, labels, classes, what = sample_grid(args)
    arr = to_uint8(images)
    scale = args.scale or (4 if arr.shape[1] < 64 else 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(arr, len(args.seeds), len(classes), scale)).save(out)
    print(f"{what}: {len(arr)} images ({len(args.seeds)} seeds x {len(classes)} classes) -> {out}")
    if args.npz:
        npz = Path(args.npz)
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, arr, labels.numpy().astype(np.int64))  # arr_0, arr_1 as guided-diffusion writes them
        print(f"ADM-layout arrays: arr_0 {arr.shape} uint8, arr_1 labels -> {npz}")
    return 0
