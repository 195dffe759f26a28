"""VAR models: the multi-scale VQVAE tokenizer, the VAR transformer, ``build_vae_var``, CoDe's
``build_vae_var_ctf`` and the named configs.

``build_vae_var`` and ``build_vae_var_ctf`` have the official signatures and defaults, so
``from varcore.models import build_vae_var`` (VAR) or ``from varcore.models import VQVAE, build_vae_var_ctf`` (CoDe)
is a drop-in replacement in an official user's script. Unlike the official functions they do not monkey-patch
``reset_parameters`` on torch classes: modules are initialised normally (and, for VAR, by ``VAR.init_weights``).
"""
from dataclasses import dataclass
from typing import Tuple, Union

import torch

from .quant import VectorQuantizer2
from .var import VAR
from .vqvae import VQVAE

__all__ = ["VQVAE", "VAR", "VectorQuantizer2", "build_vae_var", "build_vae_var_ctf", "VARConfig", "VAR_CONFIGS", "PATCH_NUMS"]

# Official scale schedules (``--pn`` presets of the official train.py), keyed by image resolution.
PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


def build_vae_var(
    device: Union[str, torch.device], patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    V: int = 4096, Cvae: int = 32, ch: int = 160, share_quant_resi: int = 4,
    num_classes: int = 1000, depth: int = 16, shared_aln: bool = False, attn_l2_norm: bool = True,
    flash_if_available: bool = True, fused_if_available: bool = True,
    init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1,
) -> Tuple[VQVAE, VAR]:
    """Build the VQVAE and the VAR of the official recipe on ``device`` (official signature and defaults).

    VAR gets ``depth`` heads of width 64 (embed_dim = 64 * depth), drop-path rate 0.1 * depth / 24, class dropout
    0.1, and the official init (``init_*`` arguments, ``init_std < 0`` meaning sqrt(1 / (3 * embed_dim))). The VAE
    is in test mode (eval, frozen). Modules are created directly on ``device``, so ``torch.device("meta")`` builds
    a model of any size without allocating its weights.
    """
    _check_depth(depth)
    with torch.device(device):
        vae = _build_vae(V, Cvae, ch, share_quant_resi, patch_nums)
        var = _build_var(vae, depth, patch_nums, num_classes, shared_aln, attn_l2_norm, flash_if_available,
                         fused_if_available, dict(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma,
                                                  init_head=init_head, init_std=init_std))
    return vae, var


def build_vae_var_ctf(
    device: Union[str, torch.device], patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    V: int = 4096, Cvae: int = 32, ch: int = 160, share_quant_resi: int = 4,
    num_classes: int = 1000, depth_draft: int = 16, depth_refine: int = 30, shared_aln: bool = False,
    attn_l2_norm: bool = True, flash_if_available: bool = True, fused_if_available: bool = True,
    init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1,
) -> Tuple[VQVAE, VAR, VAR]:
    """CoDe's builder (official signature and defaults): one VQVAE and two VARs on it, ``(vae, drafter, refiner)``.

    The drafter has depth ``depth_draft``, the refiner ``depth_refine``; each is built exactly as
    :func:`build_vae_var` builds a VAR of that depth (``depth`` heads of width 64, drop-path 0.1 * depth / 24, the
    same ``init_*`` arguments), and both hold the one ``vae`` (``vae_local``). The official defaults are kept as
    they are (drafter 16, refiner 30); CoDe's own scripts pass ``depth_draft=30, depth_refine=16``.
    """
    _check_depth(depth_draft, "depth_draft")
    _check_depth(depth_refine, "depth_refine")
    init = dict(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
    with torch.device(device):
        vae = _build_vae(V, Cvae, ch, share_quant_resi, patch_nums)
        drafter, refiner = (_build_var(vae, depth, patch_nums, num_classes, shared_aln, attn_l2_norm,
                                       flash_if_available, fused_if_available, init)
                            for depth in (depth_draft, depth_refine))
    return vae, drafter, refiner


def _build_vae(V, Cvae, ch, share_quant_resi, patch_nums) -> VQVAE:
    return VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, test_mode=True, share_quant_resi=share_quant_resi,
                 v_patch_nums=patch_nums)


def _build_var(vae, depth, patch_nums, num_classes, shared_aln, attn_l2_norm, flash_if_available,
               fused_if_available, init) -> VAR:
    """The official recipe's VAR of ``depth`` on ``vae``, initialised with ``VAR.init_weights(**init)``."""
    var = VAR(
        vae_local=vae, num_classes=num_classes, depth=depth, embed_dim=depth * 64, num_heads=depth,
        drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
        shared_aln=shared_aln, cond_drop_rate=0.1, attn_l2_norm=attn_l2_norm, patch_nums=patch_nums,
        flash_if_available=flash_if_available, fused_if_available=fused_if_available,
    )
    var.init_weights(**init)
    return var


def _check_depth(depth, name: str = "depth") -> None:
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"{name} must be an int, got {type(depth).__name__}")
    if depth < 1:
        raise ValueError(f"{name} must be >= 1, got {depth}")


@dataclass(frozen=True)
class VARConfig:
    """A released VAR model: depth, resolution, scale schedule, shared AdaLN, and the AdaLN-gamma init of its
    official training script (``--alng``)."""

    depth: int
    resolution: int
    shared_aln: bool = False
    init_adaln_gamma: float = 1e-5

    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return PATCH_NUMS[self.resolution]

    def build(self, device: Union[str, torch.device] = "cpu", **overrides) -> Tuple[VQVAE, VAR]:
        """``build_vae_var`` with this config (keyword ``overrides`` win)."""
        kwargs = dict(patch_nums=self.patch_nums, depth=self.depth, shared_aln=self.shared_aln,
                      init_adaln_gamma=self.init_adaln_gamma)
        kwargs.update(overrides)
        return build_vae_var(device, **kwargs)


VAR_CONFIGS = {
    "d16": VARConfig(depth=16, resolution=256, init_adaln_gamma=1e-3),
    "d20": VARConfig(depth=20, resolution=256, init_adaln_gamma=1e-3),
    "d24": VARConfig(depth=24, resolution=256, init_adaln_gamma=1e-4),
    "d30": VARConfig(depth=30, resolution=256, init_adaln_gamma=1e-5),
    "d36": VARConfig(depth=36, resolution=512, shared_aln=True, init_adaln_gamma=5e-6),
}
