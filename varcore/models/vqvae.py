"""``VQVAE``: VAR's multi-scale VQ tokenizer (official constructor, method names and state-dict keys).

The released ``vae_ch160v4096z32.pth`` loads with ``strict=True`` into ``VQVAE(vocab_size=4096, z_channels=32,
ch=160, v_patch_nums=...)``. Beyond the official code, ``ch_mult`` is a constructor argument, so the downsampling
factor ``2 ** (len(ch_mult) - 1)`` can be changed (the default keeps the official 16x).
"""
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from varcore.ops.quant import check_idx

from .basic_vae import Decoder, Encoder
from .quant import VectorQuantizer2

__all__ = ["VQVAE"]

PatchNums = Optional[Sequence[Union[int, Tuple[int, int]]]]


class VQVAE(nn.Module):
    """Multi-scale residual VQ autoencoder. Images are in [-1, 1]; the latent is ``downsample`` times smaller.

    Args (official unless noted): ``vocab_size`` V, ``z_channels`` Cvae, ``ch`` base width, ``dropout``, ``beta``
    (commitment weight), ``using_znorm``, ``quant_conv_ks``, ``quant_resi`` (phi ratio), ``share_quant_resi`` (number
    of shared phis; 0 = one per scale, 1 = one), ``default_qresi_counts``, ``v_patch_nums`` (scale schedule; the
    last entry is the latent size), ``test_mode`` (eval mode and frozen parameters), ``ch_mult`` (varcore: width
    multipliers per resolution level; the official value is fixed at (1, 1, 2, 2, 4)).

    Parameters get PyTorch's default initialisation (the official ``build_vae_var`` leaves them uninitialised via a
    global monkey-patch, which varcore does not do).
    """

    def __init__(
        self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 128, dropout: float = 0.0,
        beta: float = 0.25, using_znorm: bool = False, quant_conv_ks: int = 3, quant_resi: float = 0.5,
        share_quant_resi: int = 4, default_qresi_counts: int = 0,
        v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode: bool = True,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("z_channels", z_channels), ("ch", ch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if ch % 32 != 0:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm with 32 groups), got {ch}")
        if not isinstance(quant_conv_ks, int) or quant_conv_ks < 1 or quant_conv_ks % 2 == 0:
            raise ValueError(f"quant_conv_ks must be a positive odd int, got {quant_conv_ks!r}")
        # built first so that its argument checks fail fast, registered after the decoder (official key order)
        quantize = VectorQuantizer2(
            vocab_size=vocab_size, Cvae=z_channels, using_znorm=using_znorm, beta=beta,
            default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums, quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
        )
        self.test_mode = test_mode
        self.V, self.Cvae = vocab_size, z_channels
        self.vocab_size = vocab_size
        self.ch_mult = tuple(ch_mult)
        vae_cfg = dict(dropout=dropout, ch=ch, z_channels=z_channels, in_channels=3, ch_mult=self.ch_mult,
                       num_res_blocks=2, using_sa=True, using_mid_sa=True)
        self.encoder = Encoder(double_z=False, **vae_cfg)
        self.decoder = Decoder(**vae_cfg)
        self.downsample = 2 ** (len(self.ch_mult) - 1)
        self.quantize = quantize
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    def _check_img(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"{name} height and width must be multiples of {self.downsample}, "
                             f"got {tuple(x.shape[2:])}")

    def forward(self, inp: torch.Tensor, ret_usages: bool = False):
        """VAE training: returns (reconstruction, per-scale codebook usage or None, VQ loss)."""
        self._check_img(inp, "inp")
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode an accumulated latent (B, Cvae, h, w) to images in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums: PatchNums = None) -> List[torch.Tensor]:
        """Tokenise images in [-1, 1]: one (B, ph*pw) LongTensor per scale."""
        self._check_img(inp_img_no_grad, "inp_img_no_grad")
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: List[torch.Tensor], same_shape: bool, last_one: bool = False
                     ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Decode token maps (one (B, pn^2) tensor per scale) to images in [-1, 1]: one per partial sum of scales,
        or only the full reconstruction with ``last_one``. ``same_shape`` is ``all_to_max_scale`` of
        :meth:`embed_to_img`."""
        if not ms_idx_Bl:
            raise ValueError("ms_idx_Bl must hold at least one scale")
        B = ms_idx_Bl[0].shape[0]
        pns = []
        for si, idx_Bl in enumerate(ms_idx_Bl):
            pns.append(round(idx_Bl.shape[1] ** 0.5))
            if idx_Bl.ndim != 2 or idx_Bl.shape[0] != B or pns[-1] ** 2 != idx_Bl.shape[1]:
                raise ValueError(f"ms_idx_Bl[{si}] must be (B, pn^2), got {tuple(idx_Bl.shape)}")
            check_idx(idx_Bl, self.vocab_size, f"ms_idx_Bl[{si}]")
        if same_shape and last_one and tuple(pns) == self.quantize.v_patch_nums:
            return self.fhat_to_img(self.quantize.idxBl_to_fhat(ms_idx_Bl))  # the whole pyramid in one pass
        ms_h_BChw = [self.quantize.embedding(idx_Bl).transpose(1, 2).view(B, self.Cvae, pn, pn)
                     for idx_Bl, pn in zip(ms_idx_Bl, pns)]
        return self.embed_to_img(ms_h_BChw=ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one: bool = False
                     ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Decode per-scale code embeddings (B, Cvae, pn, pn) to images in [-1, 1] (see ``embed_to_fhat``)."""
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        if last_one:
            return self.fhat_to_img(f_hats)
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums: PatchNums = None, last_one: bool = False
                                 ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Encode, quantise and decode: the reconstruction after each scale, or only the last with ``last_one``."""
        self._check_img(x, "x")
        f = self.quant_conv(self.encoder(x))
        f_hats = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def adapt_state_dict(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """``state_dict`` with a ``quantize.ema_vocab_hit_SV`` saved for a different number of scales (e.g. 14 for
        1024 px) replaced by this model's own buffer, as the official VQVAE does on load. Not modified in place."""
        key = "quantize.ema_vocab_hit_SV"
        own = self.quantize.ema_vocab_hit_SV
        saved = state_dict.get(key)
        if saved is None or tuple(saved.shape) == tuple(own.shape) or saved.shape[1:] != own.shape[1:]:
            return state_dict
        state_dict = dict(state_dict)
        # a model built on the meta device (to load with assign=True) has no values to keep: use zeros
        state_dict[key] = torch.zeros_like(own, device=saved.device) if own.is_meta else own
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after :meth:`adapt_state_dict` (the official override)."""
        return super().load_state_dict(self.adapt_state_dict(state_dict), strict=strict, assign=assign)
