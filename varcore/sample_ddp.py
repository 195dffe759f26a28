"""Distributed class-conditional sampling for evaluation (FID/IS with the OpenAI ADM evaluator).

    torchrun --nproc_per_node=N -m varcore.sample_ddp --preset var-d16 --root CHECKPOINTS --out DIR
    torchrun --nproc_per_node=N -m varcore.sample_ddp --model NAME_OR_PATHS --per-class K \\
        [--classes 0,1,...] --out DIR [--cfg 1.5 --top-k 900 --top-p 0.96 --seed 0 --batch-size 32 ...]

``--preset`` names an official FID protocol (:mod:`varcore.presets`, ``varcore presets``); without one the
sampling settings default to the model's (:func:`varcore.presets.model_defaults`). ``--dtype auto`` is decided
once, on rank 0, and sent to every rank; ``run.json`` records the dtype chosen. Rank 0 prints the ADM
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

``--model`` is one of: a zoo name (``var-d16`` ... ``var-d36``, ``code-6`` ... ``code-9`` for CoDe's released
pairs, ``llamagen-b`` ... ``llamagen-3b`` and ``par-xl-4x`` ... ``par-3b-16x`` for the 384 px GPTs; files from
``--root``, ``$VARCORE_HOME`` or the hub, see :func:`varcore.checkpoints.from_pretrained`); ``VAE_PATH,VAR_PATH``
(official-format checkpoints; the VAE is put on the VAR's scale schedule); ``VQ_PATH,GPT_PATH`` (LlamaGen's VQ-16
tokenizer and a LlamaGen ``c2i_*.pt`` or PAR ``PAR-*.pt`` checkpoint, recognised by its tensors; ``--grid-size``
for the 256 px ones); ``VAE_PATH,DRAFTER_PATH,REFINER_PATH,N`` for CoDe with N drafted scales; or a model bundled
with varcore (``digits-var``, ``digits-var-small``, ``digits-code``, ``digits-var8``, ``digits-var8-small``,
``digits-code8``, ``digits-par``, ``digits-raster``; see ``varcore.digits``). Every model takes per-image seeds,
so the GPTs are sharded as the VARs are; they sample in float32 (``--dtype auto`` resolves to fp32 for them).

``--accel KEY=VALUE[,KEY=VALUE...]`` samples with training-free accelerators, in the grammar of ``varcore eval
--accel`` without the model (:mod:`varcore.digits.accel`): ``prune=-2:0.5+-1:0.5,cfg_skip=2`` for VAR and CoDe,
``draft_steps=N`` for CoDe's split, ``kv_budget=...``, ``draw=inverse_cdf``, ``sjd=W`` for the GPTs. It is part of
the settings in ``run.json`` and in every shard, and is checked against the model before anything is written.
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

from varcore.argtypes import device_arg, finite_float, out_dir_arg, positive_float, positive_int, seed_arg
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


def _is_gpt_state(obj) -> bool:
    """Whether a loaded checkpoint holds a LlamaGen/PAR GPT (its token embedding) rather than a VAR."""
    from varcore.checkpoints import gpt_state_dict

    try:
        return "tok_embeddings.weight" in gpt_state_dict(obj)
    except ValueError:
        return False


def _load_models(spec: str, device, grid_size: Optional[int] = None) -> Tuple[str, Tuple]:
    """``(family, models)``: ``("var", (vae, var))``, ``("code", (vae, drafter, refiner, draft_steps))`` or
    ``("gpt", (vq, gpt))``. ``grid_size`` is the token grid side of a GPT checkpoint given by path (default 24);
    for any other model it must be the model's own grid, or None."""
    family, models = _load_any(spec, device, grid_size)
    if grid_size is not None and (family != "gpt" or models[1].config.grid != grid_size):
        own = f"its grid is {models[1].config.grid}" if family == "gpt" else "it has no token grid to set"
        raise ValueError(f"grid_size (--grid-size) applies to GPT checkpoints given by path; model {spec!r} "
                         f"is a {family.upper()} model and {own}, got {grid_size}")
    return family, models


def _load_any(spec: str, device, grid_size: Optional[int]) -> Tuple[str, Tuple]:
    from varcore.checkpoints import (GPT_ZOO, ZOO_FILES, from_pretrained, infer_var_kwargs, load_gpt, load_vae,
                                     load_var, load_vq16, read_file, read_state_dict)

    if "," in spec:
        paths = [p.strip() for p in spec.split(",")]
        if len(paths) not in (2, 4):
            raise ValueError(f"model paths must be VAE,VAR, VQ,GPT or VAE,DRAFTER,REFINER,N (CoDe), got {spec!r}")
        obj = read_file(paths[1])
        if len(paths) == 2 and _is_gpt_state(obj):
            grid = 24 if grid_size is None else grid_size
            return "gpt", (load_vq16(paths[0], device=device), load_gpt(obj, block_size=grid ** 2, device=device))
        state = read_state_dict(obj, kind="var")
        vae = load_vae(paths[0], device=device, v_patch_nums=infer_var_kwargs(state)["patch_nums"])
        var = load_var(state, vae, device=device)
        if len(paths) == 2:
            return "var", (vae, var)
        if not paths[3].isdigit():
            raise ValueError(f"the CoDe draft step count N must be an int, got {paths[3]!r}")
        return "code", (vae, var, load_var(paths[2], vae, device=device), int(paths[3]))
    if spec in _CODE_ZOO:
        return "code", (*from_pretrained(spec, device=device), int(spec[len("code-"):]))
    if spec.startswith("var-") and spec in ZOO_FILES:
        return "var", tuple(from_pretrained(spec, device=device))
    if spec in GPT_ZOO:
        return "gpt", tuple(from_pretrained(spec, device=device))
    digits = _digits()
    if digits is not None and spec in digits.BUNDLED:
        return digits.BUNDLED[spec].family, tuple(digits.load_bundled(spec, device=device))
    zoo = sorted(k for k in ZOO_FILES if k.startswith("var-")) + sorted(_CODE_ZOO) + sorted(GPT_ZOO)
    bundled = [] if digits is None else list(digits.BUNDLED)
    raise ValueError(f"model must be a zoo name {zoo}, a bundled model {bundled}, 'VAE_PATH,VAR_PATH', "
                     f"'VQ_PATH,GPT_PATH' or 'VAE_PATH,DRAFTER_PATH,REFINER_PATH,N' (CoDe); got {spec!r}")


def _digits():
    """varcore.digits, or None in an installation without the bundled models."""
    try:
        from varcore import digits
    except ImportError:
        return None
    return digits


def _resize(images: torch.Tensor, image_size: Optional[int]) -> torch.Tensor:
    """Bicubic resize to ``image_size`` px (None or the same size: unchanged), as the GPTs' official evaluation
    does from 384 px to 256 px."""
    if image_size is None or image_size == images.shape[-1]:
        return images
    return torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bicubic")


def load_sampler(spec: str, device, dtype: str = "fp32", cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                 more_smooth: bool = False, temperature: float = 1.0, classes: Sequence[int] = (),
                 image_size: Optional[int] = None, grid_size: Optional[int] = None,
                 accel: Optional[dict] = None) -> SampleFn:
    """A function ``(labels (B,), seeds [B]) -> uint8 images (B, H, W, 3)`` for the model ``spec`` (see the module
    docstring), each image drawn from its own generator. ``classes`` (the ones to be sampled) are checked against
    the model's. ``image_size`` bicubic-resizes the decoded images (None: the model's size). The function's
    ``image_hw`` attribute is the (H, W) of its images.

    VAR and CoDe follow VAR's conventions (``top_p`` 0 disables it, the images ``x * 255`` truncated), the GPTs
    LlamaGen's (``top_p`` 1 disables it, ``127.5 x + 128`` clamped, float32 only, no ``more_smooth``).

    ``accel``: the training-free accelerators as the model's sampler takes them (``{"prune": {8: 0.5},
    "cfg_skip": 2}`` for VAR and CoDe, ``{"sjd": 8}`` for the GPTs; ``draft_steps`` sets CoDe's split; the keys of
    :data:`varcore.digits.accel.ACCEL_OPTIONS` for the model's family), checked before the function is returned."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    family, models = _load_models(spec, device, grid_size)
    return _sampler(family, models, dtype, cfg, top_k, top_p, more_smooth, temperature, classes, image_size,
                    accel=accel)


def _sampler(family: str, models: Tuple, dtype: str, *options, accel: Optional[dict] = None) -> SampleFn:
    """:func:`load_sampler`'s function for models already loaded by :func:`_load_models`."""
    from varcore.digits.accel import ACCEL_OPTIONS, option_names

    accel = dict(accel or {})
    bad = [k for k in accel if k not in ACCEL_OPTIONS or family not in ACCEL_OPTIONS[k].families]
    if bad:
        allowed = [k for k in option_names(family) if k in ACCEL_OPTIONS]
        raise ValueError(f"accel: {bad} are not accelerators of a {family} model; its keys: {allowed}")
    if family == "gpt":
        return _gpt_sampler(models, dtype, *options, accel=accel)
    return _var_sampler(family, models, dtype, *options, accel=accel)


def _check_classes(classes: Sequence[int], num_classes: int) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes must be in [0, {num_classes}) for this model, got {bad}")


def _var_sampler(family, models, dtype, cfg, top_k, top_p, more_smooth, temperature, classes, image_size, accel):
    from varcore.sampling.code import CoDeSampler
    from varcore.sampling.var import VARSampler

    var = models[1]
    _check_classes(classes, var.num_classes)
    if top_k > var.V:
        raise ValueError(f"top_k must be <= the vocabulary size {var.V} (0 disables it), got {top_k}")
    if family == "var":
        sampler = VARSampler(var, models[0], dtype=_DTYPES[dtype])
    else:
        vae, drafter, refiner, draft_steps = models
        draft_steps = accel.pop("draft_steps", draft_steps)
        sampler = CoDeSampler(drafter, refiner, draft_steps, vae, dtype=_DTYPES[dtype])
    sampler.options(cfg, top_k, top_p, temperature, more_smooth, **accel)  # the sampler's own checks, up front
    device = var.lvl_1L.device

    def sample(labels: torch.Tensor, seeds: List[int]) -> torch.Tensor:
        img = sampler.sample(len(seeds), labels.to(device), cfg=cfg, top_k=top_k, top_p=top_p,
                             more_smooth=more_smooth, temperature=temperature, seeds=seeds, **accel)
        # as the official evaluation saves its PNGs: x * 255, truncated
        img = _resize(img, image_size)
        return img.mul(255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    side = image_size or models[0].downsample * sampler.patch_nums[-1]
    sample.image_hw = (side, side)
    return sample


def _gpt_sampler(models, dtype, cfg, top_k, top_p, more_smooth, temperature, classes, image_size, accel):
    from varcore.sampling.draw import check_draw
    from varcore.sampling.par import PARSampler, to_uint8
    from varcore.sampling.sjd import check_window

    vq, gpt = models
    _check_classes(classes, gpt.num_classes)
    if dtype != "fp32":
        raise ValueError(f"dtype {dtype} applies to VAR and CoDe models; the GPT samplers run in fp32")
    if more_smooth:
        raise ValueError("more_smooth is VAR's option; GPT models have no more_smooth")
    if not isinstance(temperature, (int, float)):
        raise ValueError(f"a GPT model takes one temperature, not one per scale, got {temperature}")
    if top_k > gpt.vocab_size:
        raise ValueError(f"top_k must be <= the vocabulary size {gpt.vocab_size} (0 disables it), got {top_k}")
    sampler = PARSampler(gpt, vq, fast=True)  # the fast mode: the same distribution, drawn by inverse CDF
    check_window(accel.get("sjd"), sampler.L)
    if "draw" in accel:
        check_draw(accel["draw"])
    device = gpt.tok_embeddings.weight.device

    def sample(labels: torch.Tensor, seeds: List[int]) -> torch.Tensor:
        img = sampler.sample(labels.to(device), cfg_scale=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                             seeds=seeds, image_size=image_size, **accel)
        return to_uint8(img)  # as the official sample_c2i_ddp.py: 127.5 x + 128, clamped

    side = image_size or vq.downsample * sampler.grid
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

    def from_rank0(self, value):
        """``value`` as rank 0 has it, on every rank (a picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.enabled:
            torch.distributed.destroy_process_group()


def _accel_setting(args) -> dict:
    """``--accel`` where it was given (runs without it keep the records of earlier versions)."""
    return {} if args.accel is None else {"accel": args.accel}


def _run_record(args) -> dict:
    """The arguments that decide the images (a rerun must match them to reuse the shards)."""
    keys = ("model", "per_class", "classes", "seed", "batch_size", "cfg", "top_k", "top_p", "more_smooth",
            "temperature", "dtype", "image_size", "grid_size")
    return {**{k: getattr(args, k) for k in keys}, **_accel_setting(args)}


# Bumped when the same arguments would give other images (the per-image generators of image_seed's values).
SEEDING = "position-bijection+seeded_generator"


def _shard_settings(args) -> str:
    """What decides a shard's images besides its (class, index) items: stored in each shard, compared on reuse."""
    keys = ("model", "seed", "batch_size", "cfg", "top_k", "top_p", "more_smooth", "temperature", "dtype",
            "image_size", "grid_size")
    return json.dumps({**{k: getattr(args, k) for k in keys}, **_accel_setting(args), "seeding": SEEDING},
                      sort_keys=True)


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
        family, models = _load_models(args.model, device, args.grid_size)
        if args.dtype == "auto":
            args.dtype = "fp32" if family == "gpt" else _auto_dtype(device, dist)
        if args.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES) + ['auto']}, got {args.dtype!r}")
        from varcore.digits.accel import accel_options

        accel = accel_options(args.accel, family, 0 if family == "gpt" else len(models[1].patch_nums))
        sample = _sampler(family, models, args.dtype, args.cfg, args.top_k, args.top_p, args.more_smooth,
                          args.temperature, args.classes, args.image_size, accel=accel)
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
    p.add_argument("--model", default=None, help="zoo name (var-d16 ..., code-6 ..., llamagen-b ..., par-xl-4x ...), "
                   "bundled model name (digits-var ...), VAE_PATH,VAR_PATH, VQ_PATH,GPT_PATH or "
                   "VAE_PATH,DRAFTER_PATH,REFINER_PATH,N (needed without --preset)")
    p.add_argument("--root", default=None, help="folder of the zoo checkpoints (default: $VARCORE_HOME or the hub)")
    p.add_argument("--per-class", type=int, default=None,
                   help="images per class (the preset's, 50 for the FID protocols; needed without --preset)")
    p.add_argument("--classes", type=_classes, default=None, help="comma-separated class ids (default: all)")
    p.add_argument("--out", type=out_dir_arg, required=True,
                   help="output folder (shards/, run.json, samples.npz); reruns resume")
    s = p.add_argument_group("sampling (defaults: the preset's; without one the model's: for VAR and CoDe the VAR "
                             "FID protocol cfg 1.5, top-k 900 (at most the vocabulary), top-p 0.96; for GPTs "
                             "LlamaGen's cfg 1.5, top-k 0, top-p 1.0; a bundled model's own)")
    s.add_argument("--cfg", type=finite_float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=finite_float, default=None)
    s.add_argument("--more-smooth", action="store_true", default=None)
    s.add_argument("--temperature", type=_temperature, default=None,
                   help="one value, or comma-separated values, one per scale (CoDe's 1.1 x 7 then 1.0 x 3)")
    s.add_argument("--accel", metavar="KEY=VALUE[,KEY=VALUE...]", default=None,
                   help="training-free accelerators (off by default), in varcore eval --accel's grammar without the "
                        "model: cfg_skip=K, prune=SI:R[+SI:R...], kv_budget=SI:R[+SI:R...], draft_steps=N (CoDe's "
                        "split), draw=inverse_cdf (VAR, CoDe, GPT), sjd=W (GPT); SI < 0 counts from the last "
                        "scale, e.g. prune=-2:0.5+-1:0.5,cfg_skip=2")
    s.add_argument("--seed", type=seed_arg, default=0, help="base seed; image (c, i) gets image_seed(seed, c, i)")
    s.add_argument("--image-size", type=positive_int, default=None,
                   help="bicubic-resize the images to this many pixels (default: the model's size; the LlamaGen "
                        "and PAR presets: 256, from 384)")
    s.add_argument("--grid-size", type=positive_int, default=None,
                   help="token grid side of a GPT checkpoint given by path (default 24: the 384 px models; 16 for "
                        "the *_256.pt ones)")
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
    facts = _model_facts(args.model)
    if args.accel is not None:  # the syntax and the keys of the model's family, before anything is loaded
        from varcore.digits.accel import parse_options

        parse_options(args.accel, facts.family)
    if args.classes is None:
        args.classes = list(range(facts.num_classes))
    _fill_model_defaults(args, facts)
    asked_dtype = args.dtype
    out = run(args)
    if out is not None:
        chosen = f" (--dtype auto chose {args.dtype})" if asked_dtype == "auto" else ""
        print(f"wrote {out}{chosen}; the settings are in {Path(out).parent / RUN_FILE}", file=sys.stderr)
        if facts.num_classes == 1000:  # ImageNet: the evaluator's reference batches
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
        if args.image_size is None and preset.image_size != preset.sample_size:
            args.image_size = preset.image_size  # the GPTs: sampled at 384 px, evaluated at 256 px
    if args.model is None or args.per_class is None:
        parser.error("--model and --per-class are required without --preset")


def _fill_model_defaults(args, facts: "_ModelFacts") -> None:
    """Settings no flag or preset gave: the model's defaults (:func:`varcore.presets.model_defaults`)."""
    defaults = model_defaults(facts.family, facts.bundled_cfg, facts.vocab_size)
    for key in _SAMPLING:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])


def _auto_dtype(device: torch.device, dist: "_Dist") -> str:
    """``--dtype auto`` resolved once, on rank 0's device (:func:`varcore.sampling.auto_dtype.resolve_dtype`), and
    sent to every rank, so that all shards of a run are sampled in one dtype (GPT models sample in fp32)."""
    from varcore.sampling.auto_dtype import resolve_dtype

    choice = None
    if dist.rank == 0:
        choice = {torch.bfloat16: "bf16", torch.float32: "fp32"}[resolve_dtype("auto", device)]
    return dist.from_rank0(choice)


@dataclass(frozen=True)
class _ModelFacts:
    family: str  # "var", "code" or "gpt"
    num_classes: int
    vocab_size: int
    bundled_cfg: Optional[float]  # a bundled model's own guidance scale, else None


def _model_facts(spec: str) -> _ModelFacts:
    """What the defaults need to know of the model ``spec``, read without building it where possible."""
    from varcore.checkpoints import GPT_ZOO, gpt_state_dict, read_file, read_state_dict

    if spec.startswith("var-") or spec in _CODE_ZOO:
        # every released VAR and CoDe model: ImageNet's 1000 classes on vae_ch160v4096z32 (4096 codes)
        return _ModelFacts("code" if spec in _CODE_ZOO else "var", 1000, 4096, None)
    if spec in GPT_ZOO:
        return _ModelFacts("gpt", 1000, 16384, None)  # LlamaGen's and PAR's c2i GPTs: vq_ds16_c2i's 16384 codes
    if "," in spec:
        paths = [p.strip() for p in spec.split(",")]
        obj = read_file(paths[1]) if len(paths) in (2, 4) else None
        if len(paths) == 2 and _is_gpt_state(obj):
            state = gpt_state_dict(obj)
            return _ModelFacts("gpt", state["cls_embedding.embedding_table.weight"].shape[0] - 1,
                               state["tok_embeddings.weight"].shape[0], None)
        if obj is not None:
            state = read_state_dict(obj, kind="var")
            return _ModelFacts("var" if len(paths) == 2 else "code", state["class_emb.weight"].shape[0] - 1,
                               state["head.weight"].shape[0], None)
    family, models = _load_models(spec, "cpu")  # a bundled model (small), or the error naming the valid specs
    digits = _digits()
    cfg = digits.BUNDLED[spec].cfg if digits is not None and spec in digits.BUNDLED else None
    model = models[1]
    if family == "gpt":
        return _ModelFacts(family, model.num_classes, model.vocab_size, cfg)
    return _ModelFacts(family, model.num_classes, model.V, cfg)


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
