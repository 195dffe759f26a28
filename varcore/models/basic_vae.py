"""Convolutional encoder and decoder of VAR's VQVAE (the LDM/SD VQ-f16 design with a fused qkv attention).

Module names match the official ``basic_vae.py`` so that state-dict keys agree (``down.{i}.block.{j}``,
``down.{i}.attn.{j}``, ``down.{i}.downsample.conv``, ``mid.block_1``, ``mid.attn_1``, ``up.{i}...`` with ``up.0``
the highest resolution, ...). Parameters get PyTorch's default initialisation.
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Encoder", "Decoder", "ResnetBlock", "AttnBlock", "Upsample2x", "Downsample2x"]


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) as in the official VAE."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    """Asymmetric zero pad (right and bottom by one), then a stride-2 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    """GN-SiLU-conv3x3 twice with a residual (a 1x1 ``nin_shortcut`` when the width changes)."""

    def __init__(self, *, in_channels: int, out_channels: int = None, dropout: float):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with one fused 1x1 ``qkv`` conv split as [q | k | v]."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.C = in_channels
        self.norm = Normalize(in_channels)
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, kernel_size=1)
        self.w_ratio = in_channels ** -0.5
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        # contiguous operands as official: in half precision the bmm of a transposed view rounds differently
        w_BNN = torch.bmm(q.transpose(1, 2).contiguous(), k.contiguous()).mul_(self.w_ratio).softmax(dim=2)
        h_BCN = torch.bmm(v.contiguous(), w_BNN.transpose(1, 2).contiguous())  # w: (query, key)
        return x + self.proj_out(h_BCN.view(B, C, H, W))


def _check_ch_mult(ch_mult: Sequence[int]) -> tuple:
    ch_mult = tuple(ch_mult)
    if not ch_mult or not all(isinstance(m, int) and m > 0 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
    return ch_mult


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/2^(n-1), W/2^(n-1)) with n = len(ch_mult).

    Each level has ``num_res_blocks`` ResnetBlocks; the lowest-resolution level also has an AttnBlock after each of
    them (when ``using_sa``), and every level but the last ends with a Downsample2x.
    """

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 2,
                 dropout: float = 0.0, in_channels: int = 3, z_channels: int, double_z: bool = False,
                 using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        ch_mult = _check_ch_mult(ch_mult)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.downsample_ratio = 2 ** (self.num_resolutions - 1)
        self.num_res_blocks = num_res_blocks
        self.in_channels = in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            lowest_res = i_level == self.num_resolutions - 1
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if lowest_res and using_sa:
                    level.attn.append(AttnBlock(block_in))
            if not lowest_res:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, in_channels, h*2^(n-1), w*2^(n-1)), no output activation.

    Levels run from lowest to highest resolution with ``num_res_blocks + 1`` ResnetBlocks each (AttnBlocks
    interleaved at the lowest resolution) and an Upsample2x after every level but the highest. ``up[0]`` is the
    highest-resolution level, as in the official key layout.
    """

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 2,
                 dropout: float = 0.0, in_channels: int = 3, z_channels: int, using_sa: bool = True,
                 using_mid_sa: bool = True):
        super().__init__()
        ch_mult = _check_ch_mult(ch_mult)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.in_channels = in_channels
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            lowest_res = i_level == self.num_resolutions - 1
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if lowest_res and using_sa:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample2x(block_in)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))  # up[0] is the highest resolution

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
