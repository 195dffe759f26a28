"""The official FID sampling protocols by name, for ``python -m varcore.sample_ddp --preset NAME``.

Each :class:`Preset` holds the settings the upstream repository uses to sample its 50,000 FID images, with the file
they come from (``varcore presets`` lists them; ``docs/presets.md`` quotes the sources): VAR per depth, CoDe per
released pair, LlamaGen per size and PAR per model (the GPTs sampled at 384 px and resized to 256 px).

Without a preset, :func:`model_defaults` gives settings that fit the model: the VAR protocol with ``top_k`` capped
at the model's vocabulary, LlamaGen's sampler defaults for GPT checkpoints, and the bundled digits models' own
defaults.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

__all__ = ["Preset", "PRESETS", "FAMILIES", "get_preset", "model_defaults", "adm_evaluator_command",
           "format_presets"]

_VAR_README = "FoundationVision/VAR README.md, 'Sampling & Zero-shot Inference' (FID evaluation)"
_VAR_ZOO = "FoundationVision/VAR README.md, model zoo table (reso. column)"
_CODE_FID = "czg1225/CoDe sample_CoDe.py (the FID sampling loop: newk, temp, cfg, top_p, 50 per class)"
_CODE_ZOO = "czg1225/CoDe README.md, model zoo (drafter_N.pth / refiner_N.pth, N = 6..9)"
_LLAMAGEN_CMDS = ("FoundationVision/LlamaGen GETTING_STARTED.md, 'Sampling' (sample_c2i.sh per model: --image-size "
                  "384 --image-size-eval 256 --cfg-scale)")
_LLAMAGEN_DDP = ("FoundationVision/LlamaGen autoregressive/sample/sample_c2i_ddp.py (defaults: --top-k 0 --top-p 1.0 "
                 "--temperature 1.0 --num-fid-samples 50000; bicubic F.interpolate to --image-size-eval)")
_PAR_CMDS = ("YuqingWang1029/PAR README.md, 'Sampling' (sample_c2i.sh per model: --image-size 384 --image-size-eval "
             "256 --cfg-scale)")
_PAR_DDP = ("YuqingWang1029/PAR autoregressive/sample/sample_c2i_ddp.py (LlamaGen's defaults: --top-k 0 --top-p 1.0 "
            "--temperature 1.0 --num-fid-samples 50000)")
# CoDe's temp = [1.1]*7 + [1.0]*3, one value per scale of the 10-scale 256 px schedule
_CODE_TEMPERATURE = (1.1,) * 7 + (1.0,) * 3


@dataclass(frozen=True)
class Preset:
    """One official FID protocol: the model (a ``sample_ddp --model`` name), images per class and the sampling
    settings (``temperature``: one value, or one per scale), the image size the model samples (``sample_size``)
    and the one evaluated (``image_size``, bicubic-resized when they differ), the ADM reference batch, and the
    sources of the values. ``top_k``/``top_p`` follow the family's convention: VAR's ``top_p`` 0 and LlamaGen's
    ``top_p`` 1.0 disable it, ``top_k`` 0 disables it in both."""

    name: str
    family: str
    model: str
    per_class: int
    cfg: float
    top_k: int
    top_p: float
    more_smooth: bool
    temperature: Union[float, Tuple[float, ...]]
    image_size: int
    sample_size: int
    reference: str
    sources: Tuple[str, ...]
    notes: str = ""


def _var(depth: int, size: int) -> Preset:
    return Preset(f"var-d{depth}", "var", f"var-d{depth}", per_class=50, cfg=1.5, top_k=900, top_p=0.96,
                  more_smooth=False, temperature=1.0, image_size=size, sample_size=size,
                  reference=f"VIRTUAL_imagenet{size}_labeled.npz" if size == 256 else "VIRTUAL_imagenet512.npz",
                  sources=(_VAR_README, _VAR_ZOO),
                  notes="the README's cfg 1.5; the paper states 2.0 (a known discrepancy, raised in the VAR "
                        "repository's issues)")


def _code(n: int) -> Preset:
    return Preset(f"code-{n}", "code", f"code-{n}", per_class=50, cfg=1.5, top_k=600, top_p=0.96,
                  more_smooth=False, temperature=_CODE_TEMPERATURE, image_size=256, sample_size=256,
                  reference="VIRTUAL_imagenet256_labeled.npz", sources=(_CODE_FID, _CODE_ZOO),
                  notes=f"fine-tuned pair drafter_{n}.pth (VAR-d30) + refiner_{n}.pth (VAR-d16), {n} draft steps; "
                        f"the script's --cfg is unused, cfg 1.5 is hard-coded")


def _gpt(name: str, family: str, cfg: float, file: str, notes: str = "") -> Preset:
    sources = (_LLAMAGEN_CMDS, _LLAMAGEN_DDP) if family == "llamagen" else (_PAR_CMDS, _PAR_DDP)
    return Preset(name, family, name, per_class=50, cfg=cfg, top_k=0, top_p=1.0, more_smooth=False,
                  temperature=1.0, image_size=256, sample_size=384, reference="VIRTUAL_imagenet256_labeled.npz",
                  sources=sources, notes=f"{file}, 24 x 24 tokens; upstream samples random classes and in bf16 "
                                         f"autocast, varcore 50 per class in float32" + (f"; {notes}" if notes else ""))


# LlamaGen GETTING_STARTED.md: cfg 2.0 for GPT-B and GPT-L, 1.75 for GPT-XL and GPT-XXL, 1.65 for GPT-3B;
# PAR README.md: 1.5 for PAR-XL-4x, 1.435 for PAR-XXL-4x, 1.345 for PAR-3B-4x, 1.5 for PAR-3B-16x
_LLAMAGEN_CFG = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "3B": 1.65}
_PAR_CFG = {"XL-4x": 1.5, "XXL-4x": 1.435, "3B-4x": 1.345, "3B-16x": 1.5}

PRESETS: Dict[str, Preset] = {p.name: p for p in
                              [_var(16, 256), _var(20, 256), _var(24, 256), _var(30, 256), _var(36, 512),
                               *[_code(n) for n in (6, 7, 8, 9)],
                               *[_gpt(f"llamagen-{size.lower()}", "llamagen", cfg, f"c2i_{size}_384.pt")
                                 for size, cfg in _LLAMAGEN_CFG.items()],
                               *[_gpt(f"par-{name.lower()}", "par", cfg, f"PAR-{name}.pt",
                                      "the README's command names the file PAR-1B-4x.pt" if name == "XXL-4x" else "")
                                 for name, cfg in _PAR_CFG.items()]]}


def get_preset(name: str) -> Preset:
    """The preset ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


# the VAR FID protocol, used for any VAR or CoDe checkpoint without a preset
_VAR_PROTOCOL = dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False, temperature=1.0)
# LlamaGen's sample_c2i_ddp.py defaults (--cfg-scale 1.5, no top-k/top-p), used for any GPT without a preset
_GPT_PROTOCOL = dict(cfg=1.5, top_k=0, top_p=1.0, more_smooth=False, temperature=1.0)
FAMILIES = ("var", "code", "gpt")


def model_defaults(family: str, bundled_cfg: Optional[float], vocab_size: int) -> dict:
    """Sampling defaults for a model of ``family`` ('var', 'code' or 'gpt') without a preset: a bundled model's (its
    ``cfg``, no top-k/top-p filtering), else for a VAR or CoDe the VAR protocol with ``top_k`` at most
    ``vocab_size`` (``top_k == V`` keeps every token), for a GPT LlamaGen's sampler defaults."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    protocol = _GPT_PROTOCOL if family == "gpt" else _VAR_PROTOCOL
    if bundled_cfg is not None:
        return {**protocol, "cfg": bundled_cfg, "top_k": 0, "top_p": 1.0 if family == "gpt" else 0.0}
    return {**protocol, "top_k": min(protocol["top_k"], vocab_size)}


_REF_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{size}/{file}"


def adm_evaluator_command(samples: str, image_size: int) -> Optional[str]:
    """The OpenAI ADM evaluator command (guided-diffusion/evaluations) for an ImageNet ``samples.npz`` of
    ``image_size`` px, with the reference batch's download; None for a size without a reference batch."""
    refs = {256: "VIRTUAL_imagenet256_labeled.npz", 512: "VIRTUAL_imagenet512.npz"}
    if image_size not in refs:
        return None
    ref = refs[image_size]
    return (f"wget {_REF_URL.format(size=image_size, file=ref)} && "
            f"python guided-diffusion/evaluations/evaluator.py {ref} {samples}")


def format_presets() -> str:
    """A table of every preset with its values and sources (``varcore presets``)."""
    lines = []
    for p in PRESETS.values():
        temp = p.temperature if isinstance(p.temperature, float) else ",".join(f"{t:g}" for t in p.temperature)
        size = f"{p.image_size} px" if p.sample_size == p.image_size else f"{p.sample_size} -> {p.image_size} px"
        lines.append(f"{p.name:12s} {p.per_class}/class  cfg {p.cfg:g}  top_k {p.top_k}  top_p {p.top_p:g}  "
                     f"more_smooth {p.more_smooth}  temperature {temp}  {size}")
        lines += [f"             source: {s}" for s in p.sources]
        if p.notes:
            lines.append(f"             note: {p.notes}")
    lines.append("python -m varcore.sample_ddp --preset NAME --root CHECKPOINTS --out DIR (docs/presets.md)")
    return "\n".join(lines)
