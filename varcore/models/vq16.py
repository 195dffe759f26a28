"""LlamaGen's VQ tokenizer (``vq_ds16_c2i.pt``; spec ``code_par_llamagen.md`` B.9), with the official class names,
constructor arguments, methods and state-dict keys, so the released file loads with ``strict=True``.

VQ-16: codebook 16384 x 8 with L2-normalised codes, z_channels 256, ch 128, ch_mult (1, 1, 2, 2, 4) (x16
downsampling), GroupNorm(32, eps 1e-6), swish. The encoder has two ResnetBlocks per level and two attention blocks
at the last level; the decoder three per level and three attention blocks at its first (lowest-resolution) level.

Additions: ``ch`` and ``num_res_blocks`` in :class:`ModelArgs` (official values by default) so that small instances
can be built for tests, and :meth:`VQModel.img_to_idx` (images -> raster code indices).
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ModelArgs", "VQModel", "VectorQuantizer", "Encoder", "Decoder", "VQ_8", "VQ_16", "VQ_models"]


@dataclass
class ModelArgs:
    """Official VQ model arguments (plus ``ch`` and ``num_res_blocks``)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2

    def __post_init__(self):
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = getattr(self, name)
            if not mult or any(self.ch * m % 32 for m in mult):
                raise ValueError(f"{name} must be non-empty and ch * mult a multiple of 32 (GroupNorm), got {mult}")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv, norm-swish-dropout-conv, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels with 1x1-conv q, k, v and ``proj_out``.

    The op order is the official one (``bmm(q^T, k)``, times ``C^-0.5``, softmax over keys, ``bmm(v, w^T)``), so the
    decoder's float32 output is bit-identical to the official one; a fused attention differs by ~1e-6.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        B, C, H, W = x.shape
        q, k, v = (conv(h).reshape(B, C, H * W) for conv in (self.q, self.k, self.v))
        w = torch.bmm(q.permute(0, 2, 1), k) * (int(C) ** (-0.5))  # (B, HW queries, HW keys)
        w = F.softmax(w, dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1))                      # (B, C, HW queries)
        return x + self.proj_out(out.reshape(B, C, H, W))


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(res: List[nn.Module], attn: List[nn.Module], resample: Optional[nn.Module]) -> nn.Module:
    """One resolution level with the official attribute names ``res``, ``attn`` and ``downsample``/``upsample``."""
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(res), nn.ModuleList(attn)
    if resample is not None:
        setattr(level, "downsample" if isinstance(resample, Downsample) else "upsample", resample)
    return level


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> features (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, z_channels: int = 256):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        last = len(ch_mult) - 1
        c_in = ch
        for i, m in enumerate(ch_mult):
            c_out = ch * m
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(num_res_blocks)]
            attn = [AttnBlock(c_out) for _ in range(num_res_blocks)] if i == last else []
            self.conv_blocks.append(_level(res, attn, Downsample(c_out) if i != last else None))
            c_in = c_out
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in, dropout), AttnBlock(c_in), ResnetBlock(c_in, c_in, dropout)])
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> image (B, 3, h * 2^(levels-1), ...) in about [-1, 1]."""

    def __init__(self, z_channels: int = 256, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, out_channels: int = 3):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in, dropout), AttnBlock(c_in), ResnetBlock(c_in, c_in, dropout)])
        self.conv_blocks = nn.ModuleList()
        last = len(ch_mult) - 1
        for i in reversed(range(len(ch_mult))):  # lowest resolution first
            c_out = ch * ch_mult[i]
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(num_res_blocks + 1)]
            attn = [AttnBlock(c_out) for _ in range(num_res_blocks + 1)] if i == last else []
            self.conv_blocks.append(_level(res, attn, Upsample(c_out) if i != 0 else None))
            c_in = c_out
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser; with ``l2_norm`` both z and the codes are L2-normalised first."""

    def __init__(self, n_e: int, e_dim: int, beta: float, entropy_loss_ratio: float, l2_norm: bool,
                 show_usage: bool):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.l2_norm = n_e, e_dim, beta, l2_norm
        self.entropy_loss_ratio = entropy_loss_ratio
        self.embedding = nn.Embedding(n_e, e_dim)
        if not self.embedding.weight.is_meta:
            nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if show_usage:  # only kept so the official state dict loads strictly; varcore does not update it
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor):
        """z (B, C, h, w) -> (z_q with straight-through gradients, (vq_loss, commit_loss, entropy_loss, usage),
        (None, None, indices (B*h*w,) in raster order)); the losses are None in eval mode."""
        z = z.permute(0, 2, 3, 1).contiguous()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        flat = z.reshape(-1, self.e_dim)
        codes = self.codebook()
        d = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        indices = d.argmin(dim=1)
        z_q = codes[indices].view(z.shape)
        losses = (None, None, None, 0)
        if self.training:
            losses = (torch.mean((z_q - z.detach()) ** 2), self.beta * torch.mean((z_q.detach() - z) ** 2),
                      None, 0)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), losses, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Codes of ``indices``; with ``shape`` (B, C, h, w) (or (B, h, w, C) when not ``channel_first``)."""
        z_q = self.codebook()[indices]
        if shape is None:
            return z_q
        if channel_first:
            return z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
        return z_q.view(shape)


class VQModel(nn.Module):
    """The LlamaGen VQ tokenizer: ``encode``, ``decode``, ``decode_code`` and ``forward`` as official."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        if not isinstance(config, ModelArgs):
            raise TypeError(f"config must be a varcore.models.vq16.ModelArgs, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(ch=config.ch, ch_mult=config.encoder_ch_mult, num_res_blocks=config.num_res_blocks,
                               dropout=config.dropout_p, z_channels=config.z_channels)
        self.decoder = Decoder(z_channels=config.z_channels, ch=config.ch, ch_mult=config.decoder_ch_mult,
                               num_res_blocks=config.num_res_blocks, dropout=config.dropout_p)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim, config.commit_loss_beta,
                                        config.entropy_loss_ratio, config.codebook_l2_norm,
                                        config.codebook_show_usage)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def encode(self, x: torch.Tensor):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Raster code indices (B, h*w) and ``shape`` (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1]."""
        return self.decode(self.quantize.get_codebook_entry(code_b, shape, channel_first))

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> raster code indices (B, H/16, W/16)."""
        if not isinstance(img, torch.Tensor) or img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"img must be a (B, 3, H, W) tensor, got {getattr(img, 'shape', type(img))}")
        if img.shape[2] % self.downsample or img.shape[3] % self.downsample:
            raise ValueError(f"image size {tuple(img.shape[2:])} must be a multiple of {self.downsample}")
        B, _, H, W = img.shape
        return self.encode(img)[2][2].view(B, H // self.downsample, W // self.downsample)

    def forward(self, x: torch.Tensor):
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff


def VQ_8(**kwargs) -> VQModel:
    """VQ-8: ch_mult (1, 2, 2, 4), x8 downsampling."""
    return VQModel(ModelArgs(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4], **kwargs))


def VQ_16(**kwargs) -> VQModel:
    """VQ-16 (``vq_ds16_c2i.pt``): ch_mult (1, 1, 2, 2, 4), x16 downsampling."""
    return VQModel(ModelArgs(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4], **kwargs))


VQ_models = {"VQ-16": VQ_16, "VQ-8": VQ_8}
