"""Distributed class-conditional sampling for evaluation (FID/IS with the OpenAI ADM evaluator).

    torchrun --nproc_per_node=N -m varcore.sample_ddp --preset var-d16 --root CHECKPOINTS --out DIR
    torchrun --nproc_per_node=N -m varcore.sample_ddp --model NAME_OR_PATHS --per-class K \\
        [--classes 0,1,...] --out DIR [--cfg 1.5 --top-k 900 --top-p 0.96 --seed 0 --batch-size 32 ...]

``--preset`` names an official FID protocol (:mod:`varcore.presets`, ``varcore presets``); without one the
sampling settings default to the model's (:func:`varcore.presets.model_defaults`). Rank 0 prints the ADM
evaluator's command for an ImageNet model at the end.

writes ``DIR/samples.npz`` with ``arr_0`` (uint8, count x H x W x 3, ordered by class, then index) and ``labels``
(int64, count). Without torchrun it runs as one process.

How the work is split, and why the result does not depend on the number of processes:

* The (class, index) grid, class-major, is cut into shards of ``--batch-size`` images. Shard ``s`` goes to rank
  ``s % world_size`` and is sampled as one batch. Image (c, i) gets its own generator seeded by
  :func:`image_seed` (``--seed``, c, i), and the sampler draws each image's random numbers from its own generator
  (``VARSampler(..., seeds=...)``), so its tokens do not depend on its batch neighbours. The batches themselves are
  fixed by ``--batch-size`` alone, so even the float rounding of batched matrix products is the same for any
  world size: one process and N processes give bit-identical files on the same hardware.
* Each shard is written to ``DIR/shards/shard_XXXXXX.npz`` through a temporary file, fsync and an atomic rename,
  with the settings that decided its images. A rerun with the same arguments skips every shard that is complete
  and valid; a truncated or unreadable file, one of another shard, one written under other settings (another
  seed, model, sampling setting or seed derivation, also when ``run.json`` is gone) or with images of another
  size is sampled again, with a warning. An interrupted run loses at most the shards in flight and never
  duplicates an image.
* ``DIR/run.json`` records the arguments that decide the images; a rerun with different ones is refused instead of
  overwriting the other run's shards. It is written only after the model is loaded and every setting checked
  against it, so a refused setting leaves nothing behind.
* Rank 0 assembles the shards in plan order after a barrier and checks that the count, labels and indices are
  exactly the requested grid before writing ``samples.npz`` (atomically, too).

``--model`` is one of: a zoo name (``var-d16`` ... ``var-d36``, files from ``$VARCORE_HOME`` or the hub, see
:func:`varcore.checkpoints.from_pretrained`); ``VAE_PATH,VAR_PATH`` (official-format checkpoints; the VAE is put on
the VAR's scale schedule); ``VAE_PATH,DRAFTER_PATH,REFINER_PATH,N`` for CoDe with N drafted scales; ``code-6``
... ``code-9`` for CoDe's released pairs; or a VAR or CoDe model bundled with varcore (``digits-var``,
``digits-var-small``, ``digits-code``; see ``varcore.digits``).
"""
import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from varcore.argtypes import device_arg, finite_float, out_dir_arg, positive_float, seed_arg
from varcore.presets import adm_evaluator_command, get_preset, model_defaults

__all__ = ["image_seed", "plan_shards", "load_sampler", "run", "main", "Shard"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CODE_ZOO = {f"code-{n}" for n in (6, 7, 8, 9)}  # CoDe's released pairs (varcore.checkpoints.from_pretrained)
SHARD_DIR = "shards"
RUN_FILE = "run.json"
OUT_FILE = "samples.npz"


_INDEX_BITS = 20  # images per class below 2**20: a class's images occupy consecutive positions
_MASK64 = 2 ** 64 - 1


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints that scatters neighbouring inputs."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def image_seed(seed: int, cls: int, index: int) -> int:
    """The seed of image ``index`` of class ``cls``: a 64-bit value that depends on ``(seed, cls, index)`` only, so
    it is independent of the batch, the class list, ``--per-class`` and the world size.

    The image's position ``cls * 2**20 + index`` is added to a 64-bit hash of ``seed`` (numpy's SeedSequence) and
    scattered by a bijection, so within one run distinct images always get distinct seeds, and the samplers turn
    each into a generator whose stream depends on all of its bits (:func:`varcore.sampling.rng.seeded_generator`,
    on the CPU too)."""
    for name, v in (("seed", seed), ("cls", cls), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if index >= 2 ** _INDEX_BITS or cls >= 2 ** (64 - _INDEX_BITS):
        raise ValueError(f"index must be < 2**{_INDEX_BITS} and cls < 2**{64 - _INDEX_BITS}, got {index}, {cls}")
    lo, hi = np.random.SeedSequence(int(seed)).generate_state(2, np.uint32)
    base = int(hi) << 32 | int(lo)
    return _mix64((base + (int(cls) << _INDEX_BITS) + int(index)) & _MASK64)


@dataclass(frozen=True)
class Shard:
    """One unit of work: shard ``number`` holds the images ``items`` = ((class, index), ...) in plan order."""

    number: int
    items: Tuple[Tuple[int, int], ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([c for c, _ in self.items], dtype=np.int64)

    @property
    def indices(self) -> np.ndarray:
        return np.array([i for _, i in self.items], dtype=np.int64)

    def path(self, out_dir: Path) -> Path:
        return Path(out_dir) / SHARD_DIR / f"shard_{self.number:06d}.npz"


def plan_shards(classes: Sequence[int], per_class: int, shard_size: int) -> List[Shard]:
    """The (class, index) grid, class-major, cut into consecutive shards of ``shard_size`` images."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size (--batch-size) must be an int >= 1, got {shard_size!r}")
    if len(classes) == 0:
        raise ValueError("classes must not be empty")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat, got {list(classes)}")
    grid = [(int(c), i) for c in classes for i in range(per_class)]
    return [Shard(n, tuple(grid[s:s + shard_size])) for n, s in enumerate(range(0, len(grid), shard_size))]


# ---------------------------------------------------------------------------------------------- shard files
def _atomic_savez(path: Path, **arrays) -> None:
    """``np.savez`` to a temporary file in the same folder, fsync, then rename over ``path`` (all or nothing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(shard: Shard, out_dir: Path, images: np.ndarray, seeds: Sequence[int], settings: str) -> None:
    _atomic_savez(shard.path(out_dir), images=images, labels=shard.labels, indices=shard.indices,
                  seeds=np.array(seeds, dtype=np.uint64), settings=np.array(settings))


def _read_shard(shard: Shard, out_dir: Path, settings: str, image_hw: Tuple[int, int]) -> Optional[np.ndarray]:
    """The shard's images if its file exists and holds exactly this shard's images, sampled under ``settings``
    (see :func:`_shard_settings`) at ``image_hw``, else None (to be sampled again)."""
    path = shard.path(out_dir)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels, indices = f["images"], f["labels"], f["indices"]
            written_under = str(f["settings"]) if "settings" in f.files else None
    except Exception as e:  # truncated or foreign file: sample it again
        warnings.warn(f"sample_ddp: {path} is unreadable ({type(e).__name__}: {e}); sampling it again")
        return None
    n = len(shard.items)
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[3] != 3
            or not np.array_equal(labels, shard.labels) or not np.array_equal(indices, shard.indices)):
        warnings.warn(f"sample_ddp: {path} does not hold shard {shard.number}'s images; sampling it again")
        return None
    if written_under != settings:
        warnings.warn(f"sample_ddp: {path} was sampled under other settings ({written_under} instead of "
                      f"{settings}); sampling it again")
        return None
    if tuple(images.shape[1:3]) != tuple(image_hw):
        warnings.warn(f"sample_ddp: {path} holds {images.shape[1]}x{images.shape[2]} images, the model makes "
                      f"{image_hw[0]}x{image_hw[1]}; sampling it again")
        return None
    return images


# ---------------------------------------------------------------------------------------------- models
SampleFn = Callable[[torch.Tensor, List[int]], torch.Tensor]


def _load_models(spec: str, device) -> Tuple:
    """``(vae, var)`` for a VAR, or ``(vae, drafter, refiner, draft_steps)`` for a CoDe pair."""
    from varcore.checkpoints import ZOO_FILES, from_pretrained, infer_var_kwargs, load_vae, load_var, read_state_dict

    if "," in spec:
        paths = [p.strip() for p in spec.split(",")]
        if len(paths) not in (2, 4):
            raise ValueError(f"model paths must be VAE,VAR or VAE,DRAFTER,REFINER,N (CoDe), got {spec!r}")
        state = read_state_dict(paths[1], kind="var")
        vae = load_vae(paths[0], device=device, v_patch_nums=infer_var_kwargs(state)["patch_nums"])
        var = load_var(state, vae, device=device)
        if len(paths) == 2:
            return vae, var
        if not paths[3].isdigit():
            raise ValueError(f"the CoDe draft step count N must be an int, got {paths[3]!r}")
        return vae, var, load_var(paths[2], vae, device=device), int(paths[3])
    if spec in _CODE_ZOO:
        return (*from_pretrained(spec, device=device), int(spec[len("code-"):]))
    if spec.startswith("var-") and spec in ZOO_FILES:
        return from_pretrained(spec, device=device)
    try:
        from varcore import digits
    except ImportError:  # an installation without the bundled models
        digits = None
    if digits is not None and spec in digits.BUNDLED:
        if digits.BUNDLED[spec].family not in ("var", "code"):
            raise ValueError(f"model {spec!r} is a {digits.BUNDLED[spec].family.upper()} model; sample_ddp samples "
                             f"VAR and CoDe models (per-image seeds need their samplers)")
        return tuple(digits.load_bundled(spec, device=device))
    zoo = sorted(k for k in ZOO_FILES if k.startswith("var-")) + sorted(_CODE_ZOO)
    bundled = [] if digits is None else [n for n, b in digits.BUNDLED.items() if b.family in ("var", "code")]
    raise ValueError(f"model must be a zoo name {zoo}, a bundled model {bundled}, 'VAE_PATH,VAR_PATH' or "
                     f"'VAE_PATH,DRAFTER_PATH,REFINER_PATH,N' (CoDe); got {spec!r}")


def load_sampler(spec: str, device, dtype: str = "fp32", cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                 more_smooth: bool = False, temperature: float = 1.0, classes: Sequence[int] = ()) -> SampleFn:
    """A function ``(labels (B,), seeds [B]) -> uint8 images (B, H, W, 3)`` for the model ``spec`` (see the module
    docstring), each image drawn from its own generator. ``classes`` (the ones to be sampled) are checked against
    the model's. The function's ``image_hw`` attribute is the (H, W) of its images."""
    from varcore.sampling.code import CoDeSampler
    from varcore.sampling.var import VARSampler

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    models = _load_models(spec, device)
    var = models[1]
    bad = [c for c in classes if not 0 <= c < var.num_classes]
    if bad:
        raise ValueError(f"classes must be in [0, {var.num_classes}) for this model, got {bad}")
    if top_k > var.V:
        raise ValueError(f"top_k must be <= the vocabulary size {var.V} (0 disables it), got {top_k}")
    if len(models) == 2:
        sampler = VARSampler(var, models[0], dtype=_DTYPES[dtype])
    else:
        vae, drafter, refiner, draft_steps = models
        sampler = CoDeSampler(drafter, refiner, draft_steps, vae, dtype=_DTYPES[dtype])
    device = var.lvl_1L.device

    def sample(labels: torch.Tensor, seeds: List[int]) -> torch.Tensor:
        img = sampler.sample(len(seeds), labels.to(device), cfg=cfg, top_k=top_k, top_p=top_p,
                             more_smooth=more_smooth, temperature=temperature, seeds=seeds)
        # as the official evaluation saves its PNGs: x * 255, truncated
        return img.mul(255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    side = models[0].downsample * sampler.patch_nums[-1]
    sample.image_hw = (side, side)
    return sample


# ---------------------------------------------------------------------------------------------- the run
class _Dist:
    """torch.distributed under torchrun (NCCL with CUDA, gloo otherwise), or a single process."""

    def __init__(self, timeout_min: float):
        self.enabled = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            # ranks that finish early wait at the barrier for the others: allow long runs
            torch.distributed.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
        self.rank = torch.distributed.get_rank() if self.enabled else 0
        self.world = torch.distributed.get_world_size() if self.enabled else 1

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled:
            torch.distributed.destroy_process_group()


def _run_record(args) -> dict:
    """The arguments that decide the images (a rerun must match them to reuse the shards)."""
    keys = ("model", "per_class", "classes", "seed", "batch_size", "cfg", "top_k", "top_p", "more_smooth",
            "temperature", "dtype")
    return {k: getattr(args, k) for k in keys}


# Bumped when the same arguments would give other images (the per-image generators of image_seed's values).
SEEDING = "position-bijection+seeded_generator"


def _shard_settings(args) -> str:
    """What decides a shard's images besides its (class, index) items: stored in each shard, compared on reuse."""
    keys = ("model", "seed", "batch_size", "cfg", "top_k", "top_p", "more_smooth", "temperature", "dtype")
    return json.dumps({**{k: getattr(args, k) for k in keys}, "seeding": SEEDING}, sort_keys=True)


def _check_run_record(out_dir: Path, record: dict, dist: _Dist) -> None:
    path = out_dir / RUN_FILE
    if dist.rank == 0 and not path.is_file():
        tmp = path.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    dist.barrier()
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError(f"a JSON {type(old).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); delete it to go on (each shard is checked against the "
                         f"settings on its own) or use another --out") from None
    if old != record:
        diff = {k: (old.get(k), record.get(k)) for k in set(old) | set(record) if old.get(k) != record.get(k)}
        raise ValueError(f"{out_dir} holds a run with other settings (old, new): {diff}; use another --out "
                         f"or delete the folder")


def _assemble(out_dir: Path, plan: List[Shard], expected: int, settings: str, image_hw: Tuple[int, int]) -> Path:
    images, labels = [], []
    for shard in plan:
        got = _read_shard(shard, out_dir, settings, image_hw)
        if got is None:
            raise RuntimeError(f"shard {shard.number} is missing or invalid after sampling ({shard.path(out_dir)})")
        images.append(got)
        labels.append(shard.labels)
    arr = np.concatenate(images)
    lab = np.concatenate(labels)
    if arr.shape[0] != expected or lab.shape[0] != expected:
        raise RuntimeError(f"assembled {arr.shape[0]} images, expected {expected}")
    out = out_dir / OUT_FILE
    _atomic_savez(out, arr_0=arr, labels=lab)
    return out


def run(args) -> Optional[Path]:
    """Sample this rank's missing shards, then (rank 0) assemble ``samples.npz``; returns its path on rank 0."""
    out_dir = Path(args.out)
    plan = plan_shards(args.classes, args.per_class, args.batch_size)
    expected = len(args.classes) * args.per_class
    dist = _Dist(args.timeout_min)
    try:
        # the model first: every setting is checked against it before anything is written
        device = torch.device(args.device or (f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"))
        sample = load_sampler(args.model, device, args.dtype, args.cfg, args.top_k, args.top_p,
                              args.more_smooth, args.temperature, args.classes)
        settings, hw = _shard_settings(args), sample.image_hw
        (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        _check_run_record(out_dir, _run_record(args), dist)
        mine = [s for s in plan[dist.rank::dist.world] if _read_shard(s, out_dir, settings, hw) is None]
        from tqdm import tqdm

        for shard in tqdm(mine, desc=f"rank {dist.rank} shards", disable=args.no_progress or dist.rank != 0,
                          dynamic_ncols=True):
            seeds = [image_seed(args.seed, c, i) for c, i in shard.items]
            images = sample(torch.from_numpy(shard.labels), seeds)
            _write_shard(shard, out_dir, images.numpy(), seeds, settings)
        dist.barrier()
        return _assemble(out_dir, plan, expected, settings, hw) if dist.rank == 0 else None
    finally:
        dist.close()


def _classes(text: str) -> List[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes must be comma-separated ints, got {text!r}") from None


def _temperature(text: str) -> Union[float, List[float]]:
    values = [positive_float(t) for t in text.split(",") if t.strip()]  # each finite and > 0
    if not values:
        raise argparse.ArgumentTypeError(f"--temperature must be a float or comma-separated floats, got {text!r}")
    return values[0] if len(values) == 1 else values


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m varcore.sample_ddp",
                                description="Sample K images per class on every rank's share; write DIR/samples.npz.")
    p.add_argument("--preset", default=None, help="an official FID protocol by name (varcore presets lists them): "
                   "sets --model, --per-class and the sampling settings; explicit flags still win")
    p.add_argument("--model", default=None, help="zoo name (var-d16 ..., code-6 ...), bundled model name, "
                   "VAE_PATH,VAR_PATH or VAE_PATH,DRAFTER_PATH,REFINER_PATH,N (needed without --preset)")
    p.add_argument("--root", default=None, help="folder of the zoo checkpoints (default: $VARCORE_HOME or the hub)")
    p.add_argument("--per-class", type=int, default=None,
                   help="images per class (the preset's, 50 for the FID protocols; needed without --preset)")
    p.add_argument("--classes", type=_classes, default=None, help="comma-separated class ids (default: all)")
    p.add_argument("--out", type=out_dir_arg, required=True,
                   help="output folder (shards/, run.json, samples.npz); reruns resume")
    s = p.add_argument_group("sampling (defaults: the preset's; without one the model's: the VAR FID protocol "
                             "cfg 1.5, top-k 900 (at most the vocabulary), top-p 0.96, or a bundled model's own)")
    s.add_argument("--cfg", type=finite_float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=finite_float, default=None)
    s.add_argument("--more-smooth", action="store_true", default=None)
    s.add_argument("--temperature", type=_temperature, default=None,
                   help="one value, or comma-separated values, one per scale (CoDe's 1.1 x 7 then 1.0 x 3)")
    s.add_argument("--seed", type=seed_arg, default=0, help="base seed; image (c, i) gets image_seed(seed, c, i)")
    s.add_argument("--dtype", choices=sorted(_DTYPES) + ["auto"], default="fp32",
                   help="compute dtype of the sampler; auto: bf16 where a GEMM measured on the device is faster in "
                        "it, else fp32 (the resolved dtype is what run.json records)")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=32,
                   help="images per shard (one batch); the output depends on it, not on the number of processes")
    r.add_argument("--device", type=device_arg, default=None, help="default: cuda:LOCAL_RANK with a GPU, else cpu")
    r.add_argument("--timeout-min", type=positive_float, default=24 * 60, help="collective timeout (minutes)")
    r.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    _apply_defaults(parser, args)
    _check_args(parser, args)
    if args.root is not None:
        os.environ["VARCORE_HOME"] = args.root  # read by the zoo loader on every rank
    num_classes = _num_classes(args.model)
    if args.classes is None:
        args.classes = list(range(num_classes))
    _fill_model_defaults(args)
    if args.dtype == "auto":
        args.dtype = _auto_dtype(args.device)
    out = run(args)
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
        if num_classes == 1000:  # ImageNet: the evaluator's reference batches
            with np.load(out) as f:
                size = f["arr_0"].shape[1]
            cmd = adm_evaluator_command(str(out), size)
            if cmd:
                print(f"FID/IS with OpenAI's ADM evaluator (github.com/openai/guided-diffusion, evaluations/):\n"
                      f"  {cmd}", file=sys.stderr)
    return out


_SAMPLING = ("cfg", "top_k", "top_p", "more_smooth", "temperature")


def _apply_defaults(parser: argparse.ArgumentParser, args) -> None:
    """The preset's model, images per class and sampling settings where no flag set them."""
    if args.preset is not None:
        try:
            preset = get_preset(args.preset)
        except ValueError as e:
            parser.error(f"--preset: {e}")
        if args.model is None:
            args.model = preset.model
        if args.per_class is None:
            args.per_class = preset.per_class
        for key in _SAMPLING:
            if getattr(args, key) is None:
                value = getattr(preset, key)
                setattr(args, key, list(value) if isinstance(value, tuple) else value)
    if args.model is None or args.per_class is None:
        parser.error("--model and --per-class are required without --preset")


def _fill_model_defaults(args) -> None:
    """Settings no flag or preset gave: the model's defaults (:func:`varcore.presets.model_defaults`)."""
    if all(getattr(args, key) is not None for key in _SAMPLING):
        return
    defaults = model_defaults(_bundled_cfg(args.model), _vocab_size(args.model))
    for key in _SAMPLING:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])


def _auto_dtype(device: Optional[str]) -> str:
    """``--dtype auto`` resolved on this rank's device (:func:`varcore.sampling.auto_dtype.resolve_dtype`)."""
    from varcore.sampling.auto_dtype import resolve_dtype

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[resolve_dtype("auto", device)]


def _bundled_cfg(spec: str) -> Optional[float]:
    try:
        from varcore import digits
    except ImportError:
        return None
    return digits.BUNDLED[spec].cfg if spec in digits.BUNDLED else None


def _vocab_size(spec: str) -> int:
    """The model's token vocabulary, read without building it where possible."""
    if "," in spec:
        from varcore.checkpoints import read_state_dict

        return read_state_dict(spec.split(",")[1].strip(), kind="var")["head.weight"].shape[0]
    if spec.startswith("var-") or spec in _CODE_ZOO:
        return 4096  # every released VAR and CoDe model uses vae_ch160v4096z32 (4096 codes)
    return _load_models(spec, "cpu")[1].V


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse bad values before any process group or model is set up."""
    checks = [("--per-class", args.per_class >= 1, ">= 1"), ("--batch-size", args.batch_size >= 1, ">= 1"),
              ("--cfg", args.cfg is None or args.cfg >= 0, ">= 0"),
              ("--top-k", args.top_k is None or args.top_k >= 0, ">= 0 (0 disables it)"),
              ("--top-p", args.top_p is None or 0 <= args.top_p <= 1, "in [0, 1] (0 disables it)"),
              ("--temperature", args.temperature is None or min(np.atleast_1d(args.temperature)) > 0,
               "> 0 (each value)"), ("--seed", args.seed >= 0, ">= 0"),
              ("--classes", args.classes is None or (len(args.classes) > 0 and min(args.classes) >= 0),
               "a non-empty list of class ids >= 0")]
    for flag, ok, rule in checks:
        if not ok:
            parser.error(f"{flag} must be {rule}, got {getattr(args, flag[2:].replace('-', '_'))}")


def _num_classes(spec: str) -> int:
    """Number of classes of the model ``spec``: a released model's 1000 ImageNet classes, a checkpoint's from its
    class embedding, a bundled model's from the model."""
    if spec.startswith("var-") or spec in _CODE_ZOO:
        return 1000
    if "," in spec:
        from varcore.checkpoints import read_state_dict

        return read_state_dict(spec.split(",")[1].strip(), kind="var")["class_emb.weight"].shape[0] - 1
    return _load_models(spec, "cpu")[1].num_classes


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """:func:`main` for the command line: a user's mistake (a bad value, a missing or damaged file, another run's
    folder) is one line on stderr and exit status 2, not a traceback."""
    try:
        main(argv)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"sample_ddp: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
