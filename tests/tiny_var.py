"""Tiny random-weight VQVAE/VAR pairs for the sampler, accelerator and sync tests."""
import torch

from varcore.models import VAR, VQVAE


def tiny_vae(patch_nums, seed=0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=patch_nums, ch_mult=(1, 1))


def tiny_var(vae: VQVAE, depth=2, width=64, seed=1) -> VAR:
    """A VAR (in training mode) whose weights all matter (the official init makes the AdaLN and head nearly zero)."""
    torch.manual_seed(seed)
    var = VAR(vae, num_classes=10, depth=depth, embed_dim=width, num_heads=2, patch_nums=vae.quantize.v_patch_nums)
    with torch.no_grad():
        for p in var.parameters():
            p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5)
    return var
