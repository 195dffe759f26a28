"""Tiny random-weight VQVAE/VAR pairs for the sampler, accelerator and sync tests."""
import torch
from torch.utils.flop_counter import FlopCounterMode

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


def agree(a, b) -> float:
    """The fraction of equal tokens between two lists of token maps."""
    return sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)


def phase_flops(sampler, labels: torch.Tensor, ops=None, **kw) -> dict:
    """The FLOPs counted by FlopCounterMode in each (phase, scale) of one ``sampler.sample`` call on ``labels``
    (keyword arguments ``kw``): all of them, or those of the aten ops named in ``ops`` (e.g. ``"aten.mm"``)."""
    flops, real = {}, sampler._run

    def counted(phase, opts, inputs, state):
        with FlopCounterMode(display=False) as counter:
            out = real(phase, opts, inputs, state)
        counts = counter.get_flop_counts()["Global"]
        flops[(phase, opts.si)] = sum(n for op, n in counts.items() if ops is None or str(op) in ops)
        return out

    sampler._run = counted
    try:
        sampler.sample(len(labels), labels, **kw)
    finally:
        del sampler._run
    return flops
