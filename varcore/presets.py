"""The official FID sampling protocols by name, for ``python -m varcore.sample_ddp --preset NAME``.

Each :class:`Preset` holds the settings the upstream repository uses to sample its 50,000 FID images, with the file
they come from (``varcore presets`` lists them; ``docs/presets.md`` quotes the sources). Only families that
``sample_ddp`` can run are here: VAR and CoDe. The LlamaGen and PAR protocols are described in ``docs/presets.md``
but are not presets, since ``sample_ddp`` does not sample the GPT models yet.

Without a preset, :func:`model_defaults` gives settings that fit the model: the VAR protocol with ``top_k`` capped
at the model's vocabulary, and the bundled digits models' own defaults.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

__all__ = ["Preset", "PRESETS", "get_preset", "model_defaults", "adm_evaluator_command", "format_presets"]

_VAR_README = "FoundationVision/VAR README.md, 'Sampling & Zero-shot Inference' (FID evaluation)"
_VAR_ZOO = "FoundationVision/VAR README.md, model zoo table (reso. column)"
_CODE_FID = "czg1225/CoDe sample_CoDe.py (the FID sampling loop: newk, temp, cfg, top_p, 50 per class)"
_CODE_ZOO = "czg1225/CoDe README.md, model zoo (drafter_N.pth / refiner_N.pth, N = 6..9)"
# CoDe's temp = [1.1]*7 + [1.0]*3, one value per scale of the 10-scale 256 px schedule
_CODE_TEMPERATURE = (1.1,) * 7 + (1.0,) * 3


@dataclass(frozen=True)
class Preset:
    """One official FID protocol: the model (a ``sample_ddp --model`` name), images per class and the sampling
    settings (``temperature``: one value, or one per scale), the image size sampled and evaluated, the ADM
    reference batch, and the sources of the values."""

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
    reference: str
    sources: Tuple[str, ...]
    notes: str = ""


def _var(depth: int, size: int) -> Preset:
    return Preset(f"var-d{depth}", "var", f"var-d{depth}", per_class=50, cfg=1.5, top_k=900, top_p=0.96,
                  more_smooth=False, temperature=1.0, image_size=size,
                  reference=f"VIRTUAL_imagenet{size}_labeled.npz" if size == 256 else "VIRTUAL_imagenet512.npz",
                  sources=(_VAR_README, _VAR_ZOO),
                  notes="the README's cfg 1.5; the paper states 2.0 (a known discrepancy, raised in the VAR "
                        "repository's issues)")


def _code(n: int) -> Preset:
    return Preset(f"code-{n}", "code", f"code-{n}", per_class=50, cfg=1.5, top_k=600, top_p=0.96,
                  more_smooth=False, temperature=_CODE_TEMPERATURE, image_size=256,
                  reference="VIRTUAL_imagenet256_labeled.npz", sources=(_CODE_FID, _CODE_ZOO),
                  notes=f"fine-tuned pair drafter_{n}.pth (VAR-d30) + refiner_{n}.pth (VAR-d16), {n} draft steps; "
                        f"the script's --cfg is unused, cfg 1.5 is hard-coded")


PRESETS: Dict[str, Preset] = {p.name: p for p in
                              [_var(16, 256), _var(20, 256), _var(24, 256), _var(30, 256), _var(36, 512),
                               *[_code(n) for n in (6, 7, 8, 9)]]}


def get_preset(name: str) -> Preset:
    """The preset ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


# the VAR FID protocol, used for any VAR or CoDe checkpoint without a preset
_VAR_PROTOCOL = dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False, temperature=1.0)


def model_defaults(bundled_cfg: Optional[float], vocab_size: int) -> dict:
    """Sampling defaults for a model without a preset: a bundled model's (its ``cfg``, no top-k/top-p filtering),
    else the VAR protocol with ``top_k`` at most ``vocab_size`` (``top_k == V`` keeps every token)."""
    if bundled_cfg is not None:
        return dict(cfg=bundled_cfg, top_k=0, top_p=0.0, more_smooth=False, temperature=1.0)
    return {**_VAR_PROTOCOL, "top_k": min(_VAR_PROTOCOL["top_k"], vocab_size)}


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
        lines.append(f"{p.name:8s} --model {p.model:7s} {p.per_class}/class  cfg {p.cfg:g}  top_k {p.top_k}  "
                     f"top_p {p.top_p:g}  more_smooth {p.more_smooth}  temperature {temp}  {p.image_size} px")
        lines += [f"         source: {s}" for s in p.sources]
        if p.notes:
            lines.append(f"         note: {p.notes}")
    lines.append("LlamaGen and PAR protocols: docs/presets.md (sample_ddp does not sample GPT models yet)")
    return "\n".join(lines)
