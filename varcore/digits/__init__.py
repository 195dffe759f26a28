"""Tiny models trained on scikit-learn's digits and shipped inside varcore (no download needed).

Names (:data:`BUNDLED`):

* ``digits-var``: the VAR (depth 4) on a multi-scale VQVAE, next-scale prediction over scales (1, 2, 3, 4) of a
  4x4 latent (30 tokens);
* ``digits-var-small``: the quarter-size VAR (depth 2) alone, the CoDe refiner;
* ``digits-code``: CoDe, the depth-4 VAR drafting the first :data:`CODE_DRAFT_STEPS` scales and the small VAR
  refining the rest;
* ``digits-var8``, ``digits-var8-small``, ``digits-code8``: the same three on an 8x8 latent with scales
  (1, 2, 3, 4, 6, 8) (130 tokens), CoDe drafting the first :data:`CODE8_DRAFT_STEPS` scales;
* ``digits-par``: a PAR-4x GPT (4 tokens per step) on a single-scale VQ tokenizer (16x16 codes);
* ``digits-raster``: a GPT of the same size trained for raster decoding (one token per step) on the same codes.

Two entry points:

* :func:`load_bundled` ``(name, device)`` gives the modules: ``(vae, var)`` for the VAR names (a tuple, so it
  drops in where a VQVAE/VAR pair is expected), ``(vae, drafter, refiner, draft_steps)`` for CoDe and
  ``(vq, gpt)`` for the GPTs (all NamedTuples, eval mode, float32, no gradients).
* :class:`DigitsSampler` ``(name).sample(labels, seed=...)`` draws 16x16 images in [0, 1] with any of them through
  the matching varcore sampler (:class:`~varcore.sampling.var.VARSampler`, :class:`~varcore.sampling.code.
  CoDeSampler` or :class:`~varcore.sampling.par.PARSampler`), with one interface; the samplers' training-free
  accelerators (:data:`varcore.digits.accel.ACCEL_OPTIONS`: ``cfg_skip``, ``prune``) pass through as keywords.

The recipe that produced the weights is :mod:`varcore.digits.training` (``varcore train-digits``).
"""
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Sequence, Union

import torch

from varcore.models.code import check_draft_steps
from varcore.sampling.rng import seeded_generator

from .accel import ACCEL_OPTIONS
from .data import IMAGE_SIZE, NUM_CLASSES, load_digits
from .recipe import WEIGHTS_DIR, load_weights

__all__ = ["BUNDLED", "CODE_DRAFT_STEPS", "CODE8_DRAFT_STEPS", "BundledInfo", "VARBundle", "CoDeBundle", "GPTBundle",
           "load_bundled", "bundled_names", "DigitsSampler", "load_digits", "IMAGE_SIZE", "NUM_CLASSES"]

CODE_DRAFT_STEPS = 2
CODE8_DRAFT_STEPS = 4


@dataclass(frozen=True)
class BundledInfo:
    """A bundled model: its family ('var', 'code' or 'gpt'), the weight files it uses, its decoding, the
    sampling defaults (classifier-free guidance scale) and, for CoDe, the scales the drafter draws."""

    family: str
    parts: tuple
    decoding: str
    description: str
    cfg: float
    draft_steps: int = 0


BUNDLED: Dict[str, BundledInfo] = {
    "digits-var": BundledInfo("var", ("vqvae", "var-drafter"), "next-scale",
                              "VAR depth 4 on a multi-scale VQVAE", cfg=2.0),
    "digits-var-small": BundledInfo("var", ("vqvae", "var-refiner"), "next-scale",
                                    "VAR depth 2 (the CoDe refiner alone)", cfg=2.0),
    "digits-code": BundledInfo("code", ("vqvae", "var-drafter", "var-refiner"), f"CoDe N={CODE_DRAFT_STEPS}",
                               "CoDe: VAR depth 4 drafts, VAR depth 2 refines", cfg=2.0,
                               draft_steps=CODE_DRAFT_STEPS),
    "digits-par": BundledInfo("gpt", ("vq", "gpt-par"), "PAR-4x",
                              "PAR GPT (4 layers) on a single-scale VQ, 4 tokens per step", cfg=2.0),
    "digits-raster": BundledInfo("gpt", ("vq", "gpt-raster"), "raster",
                                 "GPT (4 layers) on a single-scale VQ, raster order", cfg=2.0),
    "digits-var8": BundledInfo("var", ("vqvae8", "var8-drafter"), "next-scale",
                               "VAR depth 4 on an 8x8-latent multi-scale VQVAE, 6 scales", cfg=2.0),
    "digits-var8-small": BundledInfo("var", ("vqvae8", "var8-refiner"), "next-scale",
                                     "VAR depth 2 on the 8x8 latent (the CoDe8 refiner alone)", cfg=2.0),
    "digits-code8": BundledInfo("code", ("vqvae8", "var8-drafter", "var8-refiner"), f"CoDe N={CODE8_DRAFT_STEPS}",
                                "CoDe on the 8x8 latent: VAR depth 4 drafts, VAR depth 2 refines", cfg=2.0,
                                draft_steps=CODE8_DRAFT_STEPS),
}


class VARBundle(NamedTuple):
    vae: torch.nn.Module
    var: torch.nn.Module


class CoDeBundle(NamedTuple):
    vae: torch.nn.Module
    drafter: torch.nn.Module
    refiner: torch.nn.Module
    draft_steps: int


class GPTBundle(NamedTuple):
    vq: torch.nn.Module
    gpt: torch.nn.Module


def bundled_names() -> list:
    """The names :func:`load_bundled` and :class:`DigitsSampler` accept."""
    return list(BUNDLED)


def _info(name: str) -> BundledInfo:
    if name not in BUNDLED:
        raise ValueError(f"name must be one of the bundled models {bundled_names()}, got {name!r}")
    return BUNDLED[name]


def load_bundled(name: str, device: Union[str, torch.device] = "cpu", weights_root=None
                 ) -> Union[VARBundle, CoDeBundle, GPTBundle]:
    """The modules of bundled model ``name`` on ``device`` (see the module docstring); ``weights_root`` reads the
    safetensors files from another directory (e.g. the output of ``varcore train-digits --out``)."""
    info = _info(name)
    first = load_weights(info.parts[0], root=weights_root, device=device)
    rest = [load_weights(p, vae=first, root=weights_root, device=device) for p in info.parts[1:]]
    if info.family == "var":
        return VARBundle(first, rest[0])
    if info.family == "code":
        return CoDeBundle(first, rest[0], rest[1], info.draft_steps)
    return GPTBundle(first, rest[0])


def _labels_tensor(labels, device) -> torch.Tensor:
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = [labels]
    t = torch.as_tensor(labels, device=device)
    if t.ndim != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"labels must be a non-empty 1-D sequence of ints, got {labels!r}")
    if int(t.min()) < 0 or int(t.max()) >= NUM_CLASSES:
        raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got {t.tolist()}")
    return t.long()


class DigitsSampler:
    """Sampling with a bundled model (``name`` in :data:`BUNDLED`) through one interface.

    ``steps`` is the number of transformer forward passes per call (scales for VAR/CoDe, decoding steps for GPTs)
    where it is fixed; :attr:`forward_passes` is the count of the last call. ``scales`` is the scale count of a
    VAR or CoDe model (None for a GPT).
    ``dtype`` is the VAR and CoDe samplers' compute dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16``
    or ``"auto"``, see :class:`~varcore.sampling.var.VARSampler`); the GPTs sample in float32.
    """

    def __init__(self, name: str, device: Union[str, torch.device] = "cpu", weights_root=None,
                 dtype: Union[str, torch.dtype] = torch.float32):
        self.name, self.info = name, _info(name)
        self.device = torch.device(device)
        self.modules = load_bundled(name, device=self.device, weights_root=weights_root)
        if self.info.family == "var":
            from varcore.sampling.var import VARSampler

            self._sampler = VARSampler(self.modules.var, self.modules.vae, dtype=dtype)
            self.steps = len(self.modules.var.patch_nums)
            self.scales = self.steps
        elif self.info.family == "code":
            from varcore.sampling.code import CoDeSampler

            m = self.modules
            self._sampler = CoDeSampler(m.drafter, m.refiner, m.draft_steps, m.vae, dtype=dtype)
            self._code_samplers = {m.draft_steps: self._sampler}  # one per CoDe split (draft_steps=)
            self.steps = len(m.drafter.patch_nums)
            self.scales = self.steps
        else:
            from varcore.sampling.par import PARSampler

            if dtype not in (torch.float32, "auto"):
                raise ValueError(f"dtype of a GPT model must be torch.float32 or 'auto' (float32), got {dtype}")
            self._sampler = PARSampler(self.modules.gpt, self.modules.vq)
            self.steps = self._sampler.steps
            self.scales = None

    @property
    def decoding(self) -> str:
        return self.info.decoding

    def decoding_for(self, accel: dict) -> str:
        """The decoding of a call with the accelerators ``accel``: CoDe's with its split, ``draft_steps`` included."""
        n = accel.get("draft_steps")
        return self.decoding if n is None else f"CoDe N={n}"

    @property
    def forward_passes(self) -> int:
        """Model forward calls of the last :meth:`sample` call: the sampler's own count where it keeps one (a
        ``forward_passes`` attribute set after each call, for samplers whose count depends on the draws), else the
        fixed :attr:`steps` (VAR: one per scale; CoDe: the drafter's N scales plus the refiner's prefill and its
        other scales; GPT: one per decoding step)."""
        passes = getattr(self._sampler, "forward_passes", None)
        return self.steps if passes is None else passes

    def accel_options(self) -> list:
        """The accelerator keywords :meth:`sample` takes for this model (:data:`~varcore.digits.accel.ACCEL_OPTIONS`
        entries of its family)."""
        return [k for k, o in ACCEL_OPTIONS.items() if self.info.family in o.families]

    def _check_accel(self, accel: dict) -> None:
        unknown = [k for k in accel if k not in self.accel_options()]
        if unknown:
            raise TypeError(f"{self.name} ({self.info.family}) takes the accelerator keywords "
                            f"{self.accel_options()}, got {unknown}")

    def _sampler_for(self, accel: dict):
        """(the sampler, the options of its calls) for the accelerators ``accel``: the options of the sampler's
        construction (``draft_steps``) pick a sampler, built on first use and kept; the others are passed on."""
        self._check_accel(accel)
        call = {k: v for k, v in accel.items() if not ACCEL_OPTIONS[k].build}
        n = accel.get("draft_steps")
        if n is None:
            return self._sampler, call
        sampler = self._code_samplers.get(check_draft_steps(n, self.scales))
        if sampler is None:
            from varcore.sampling.code import CoDeSampler

            m = self.modules
            sampler = CoDeSampler(m.drafter, m.refiner, n, m.vae, dtype=self._sampler.dtype)
            self._code_samplers[n] = sampler
        return sampler, call

    def kv_cache_bytes(self, B: int, **accel) -> Optional[int]:
        """KV-cache bytes of a call on B images with the accelerators ``accel`` (those that change the cache are
        passed to the sampler's ``kv_cache_bytes``; CoDe: the peak of its two stages); None where the sampler has no
        ``kv_cache_bytes``."""
        sampler, call = self._sampler_for(accel)
        count = getattr(sampler, "kv_cache_bytes", None)
        if count is None:
            return None
        nbytes = count(B, **{k: v for k, v in call.items() if ACCEL_OPTIONS[k].kv})
        return nbytes["peak"] if isinstance(nbytes, dict) else int(nbytes)

    def sample(self, labels: Union[int, Sequence[int], torch.Tensor], seed: Optional[int] = None,
               cfg: Optional[float] = None, top_k: int = 0, top_p: float = 1.0, progress: bool = False, **accel
               ) -> torch.Tensor:
        """Images (B, 3, 16, 16) in [0, 1] for ``labels`` (B,). ``seed`` seeds one generator for the call (None:
        the global RNG); the same seed and labels give the same images. ``cfg`` is the classifier-free guidance
        scale (None: the model's default; VAR ramps it over the scales as official, the GPTs use it constantly);
        ``top_k`` (0: off) and ``top_p`` (1.0: off) filter the logits of every step. ``accel``: the sampler's
        training-free accelerators (:meth:`accel_options`, e.g. ``cfg_skip=1, prune={3: 0.5}`` for VAR and CoDe),
        passed through as the sampler takes them (``draft_steps=N`` samples CoDe with that split); others raise
        TypeError."""
        sampler, call = self._sampler_for(accel)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        cfg = self.info.cfg if cfg is None else cfg
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or cfg < 0:
            raise ValueError(f"cfg must be a number >= 0, got {cfg!r}")
        labels = _labels_tensor(labels, self.device)
        B = labels.shape[0]
        if self.info.family in ("var", "code"):
            # VAR's guidance is (1 + t) cond - t uncond with t ramped to cfg; top_p 0 means off there
            return sampler.sample(B, labels, g_seed=seed, cfg=float(cfg), top_k=top_k,
                                  top_p=0.0 if top_p >= 1.0 else float(top_p), progress=progress, **call)
        gen = None if seed is None else seeded_generator(seed, self.device)
        sampler.progress = progress
        images = sampler.sample(labels, cfg_scale=float(cfg), top_k=top_k, top_p=float(top_p), generator=gen, **call)
        return images.clamp(-1, 1).add(1).mul(0.5)
