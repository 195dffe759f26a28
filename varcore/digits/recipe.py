"""Architectures of the bundled digits models, and reading/writing their weights.

All models work on 16x16 digit images (:mod:`varcore.digits.data`):

* ``vqvae``: VAR's multi-scale VQVAE (official architecture, ``ch_mult`` (1, 1, 1): x4 downsampling to a 4x4
  latent) with scales (1, 2, 3, 4) and a 512-code vocabulary;
* ``var-drafter``: a VAR of depth 4, width 64 on that tokenizer (the bundled VAR model and CoDe's drafter);
* ``var-refiner``: a VAR of depth 2, width 48, about a quarter of the drafter's parameters (CoDe's refiner);
* ``vq``: LlamaGen's single-scale VQ tokenizer (``ch_mult`` (1,): no downsampling, a 16x16 grid of codes, one
  per pixel with the convolutions' context, 256 codes);
* ``gpt-par`` / ``gpt-raster``: two LlamaGen/PAR GPTs of the same size (4 layers, width 64) on the ``vq`` codes,
  one trained for PAR-4x decoding (M = 2) and one for raster decoding (M = 1);
* ``vqvae8``: the same VQVAE with ``ch_mult`` (1, 1) (x2 downsampling to an 8x8 latent) and scales
  (1, 2, 3, 4, 6, 8), 130 tokens per image;
* ``var8-drafter`` / ``var8-refiner``: VARs of the drafter's and the refiner's sizes on ``vqvae8``;
* ``classifier``: the small CNN of the quality harness (:mod:`varcore.digits.classifier`).

Weights are safetensors files in ``varcore/digits/weights/`` whose metadata holds the recipe version and the
architecture, so :func:`load_weights` rebuilds a model from the file alone.
"""
import copy
import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from varcore.digits.data import NUM_CLASSES

__all__ = ["WEIGHTS_DIR", "ARCHS", "build", "save_weights", "load_weights", "weights_path", "PATCH_NUMS",
           "PATCH_NUMS8", "RECIPE_VERSION", "VAR_TOKENIZER"]

RECIPE_VERSION = "2"  # 2: the GPTs work on a 16x16 code grid (version 1: 8x8, x2 downsampling)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PATCH_NUMS = (1, 2, 3, 4)
PATCH_NUMS8 = (1, 2, 3, 4, 6, 8)  # the 8x8-latent family: 130 tokens per image (30 on the 4x4 latent)

# Training is a few hundred steps over a few epochs of augmented digits: dropout only slows it down here.
_NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)

ARCHS: Dict[str, Dict] = {
    "vqvae": dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1, 1), v_patch_nums=PATCH_NUMS,
                  share_quant_resi=4, quant_resi=0.5),
    "var-drafter": dict(depth=4, embed_dim=64, num_heads=2),
    "var-refiner": dict(depth=2, embed_dim=48, num_heads=2),
    "vqvae8": dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1), v_patch_nums=PATCH_NUMS8,
                   share_quant_resi=4, quant_resi=0.5),
    "var8-drafter": dict(depth=4, embed_dim=64, num_heads=2),
    "var8-refiner": dict(depth=2, embed_dim=48, num_heads=2),
    "vq": dict(codebook_size=256, codebook_embed_dim=8, z_channels=32, ch=32, encoder_ch_mult=[1],
               decoder_ch_mult=[1], num_res_blocks=1, codebook_show_usage=False),
    "gpt-par": dict(dim=64, n_layer=4, n_head=2, multiple_of=32, vocab_size=256, block_size=256,
                    num_classes=NUM_CLASSES, ar_token_num=4, spe_token_num=3, **_NO_DROPOUT),
    "gpt-raster": dict(dim=64, n_layer=4, n_head=2, multiple_of=32, vocab_size=256, block_size=256,
                       num_classes=NUM_CLASSES, ar_token_num=1, spe_token_num=0, **_NO_DROPOUT),
    "classifier": dict(width=32, feature_dim=64),
}
# loaded frozen (the tokenizers, as the official loaders do, and the evaluation classifier); the rest trainable
FROZEN_PARTS = ("vqvae", "vqvae8", "vq", "classifier")
# the multi-scale tokenizer each VAR part predicts the tokens of
VAR_TOKENIZER = {"var-drafter": "vqvae", "var-refiner": "vqvae", "var8-drafter": "vqvae8", "var8-refiner": "vqvae8"}


def _check_part(part: str) -> None:
    if part not in ARCHS:
        raise ValueError(f"part must be one of {sorted(ARCHS)}, got {part!r}")


def build(part: str, vae: Optional[nn.Module] = None, arch: Optional[Dict] = None) -> nn.Module:
    """A freshly initialised model for ``part`` (one of :data:`ARCHS`) with architecture ``arch`` (default: the
    recipe's). VAR parts need the multi-scale ``vae`` they predict tokens of."""
    _check_part(part)
    arch = dict(ARCHS[part] if arch is None else arch)
    if part in ("vqvae", "vqvae8"):
        from varcore.models.vqvae import VQVAE

        return VQVAE(test_mode=False, **arch)
    if part in VAR_TOKENIZER:
        from varcore.models.vqvae import VQVAE
        from varcore.train.var_trainer import build_var_for_training

        if not isinstance(vae, VQVAE):
            raise TypeError(f"building {part} needs the multi-scale VQVAE as vae, got {type(vae).__name__}")
        return build_var_for_training(vae, depth=arch["depth"], num_classes=NUM_CLASSES, width=arch["embed_dim"],
                                      heads=arch["num_heads"], init_adaln_gamma=1e-3)
    if part == "vq":
        from varcore.models.vq16 import ModelArgs, VQModel

        return VQModel(ModelArgs(**arch))
    if part.startswith("gpt-"):
        from varcore.models.gpt import ModelArgs, Transformer

        return Transformer(ModelArgs(**arch))
    from varcore.digits.classifier import DigitClassifier

    return DigitClassifier(**arch)


def weights_path(part: str, root: Optional[Union[str, Path]] = None) -> Path:
    _check_part(part)
    return Path(WEIGHTS_DIR if root is None else root) / f"{part}.safetensors"


def save_weights(part: str, model: nn.Module, root: Optional[Union[str, Path]] = None,
                 info: Optional[Dict] = None) -> Path:
    """Write ``model``'s state dict (float tensors as float16, to keep the package small) with the architecture
    and ``info`` (training metrics) in the metadata."""
    path = weights_path(part, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    meta = {"recipe_version": RECIPE_VERSION, "part": part, "arch": json.dumps(ARCHS[part]),
            "info": json.dumps(info or {})}
    save_file(state, str(path), metadata=meta)
    path.chmod(0o644)  # safetensors creates files readable by the owner only; these are package data
    return path


def _open(path: Path):
    """``safe_open`` of a weights file, with its failures named (empty, truncated or not safetensors)."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}; train them with `varcore train-digits`")
    if path.stat().st_size == 0:
        raise ValueError(f"weights file {path} is empty (0 bytes)")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError names neither the file nor always the cause
        raise ValueError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e}); it may be truncated "
                         f"or damaged") from None


def read_metadata(part: str, root: Optional[Union[str, Path]] = None) -> Dict:
    """The metadata of a weights file: ``arch`` and ``info`` decoded from JSON, and ``shapes``, the shape of
    every tensor in the file (read from its header, nothing loaded)."""
    path = weights_path(part, root)
    with _open(path) as f:
        meta = dict(f.metadata() or {})
        meta["shapes"] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key in ("arch", "info"):
        try:
            meta[key] = json.loads(meta.get(key, "{}"))
        except ValueError as e:
            raise ValueError(f"{path}: the metadata entry {key!r} is not valid JSON ({e})") from None
    if not isinstance(meta["arch"], dict):
        raise ValueError(f"{path}: the metadata entry 'arch' must be a JSON object, got {meta['arch']!r}")
    return meta


def _check_arch(part: str, path: Path, meta: Dict, vae: Optional[nn.Module]) -> None:
    """The architecture the metadata claims, built on the meta device (no memory), must have exactly the file's
    tensors and shapes: metadata never makes the loader allocate more than the file holds."""
    try:
        with torch.device("meta"):  # a VAR part is built on a meta copy of its VQVAE (it is moved to the VAE's device)
            meta_vae = None if vae is None else copy.deepcopy(vae).to("meta")
            own = {k: tuple(v.shape) for k, v in build(part, vae=meta_vae, arch=meta["arch"]).state_dict().items()}
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: the metadata's architecture {meta['arch']} does not build a {part} "
                         f"({type(e).__name__}: {e})") from None
    shapes = meta["shapes"]
    wrong = [f"{k}: file {shapes.get(k)} vs architecture {s}" for k, s in own.items() if shapes.get(k) != s]
    extra = sorted(set(shapes) - set(own))
    if wrong or extra:
        raise ValueError(f"{path}: the tensors do not match the architecture in its metadata "
                         f"({meta['arch']}): {wrong[:5]}{' unexpected: ' + str(extra[:5]) if extra else ''}")


def load_weights(part: str, vae: Optional[nn.Module] = None, root: Optional[Union[str, Path]] = None,
                 device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild ``part`` from its weights file (architecture from the file's metadata) in eval mode, float32.
    As with the official checkpoints' loaders, the tokenizers come frozen and the transformers trainable
    (``requires_grad`` on, :data:`FROZEN_PARTS`), so a bundled model can be fine-tuned like a loaded one."""
    meta = read_metadata(part, root)
    path = weights_path(part, root)
    _check_arch(part, path, meta, vae)
    model = build(part, vae=vae, arch=meta["arch"])
    state = load_file(str(path))
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    from varcore.checkpoints import nonfinite_entries

    nonfinite = nonfinite_entries(state, {name for name, _ in model.named_parameters()})
    if nonfinite:
        raise ValueError(f"{path} holds NaN or inf in {nonfinite[:8]}: damaged weights; refusing to load them")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(part not in FROZEN_PARTS)
