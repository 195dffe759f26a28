"""``VAR``: the class-conditional next-scale-prediction transformer (official constructor, methods, state-dict keys).

The released ``var_d16.pth`` ... ``var_d36.pth`` load with ``strict=True``. The VQVAE is held outside the module
tree (``vae_proxy``), so its weights are not part of VAR's state dict, as in the official code.

Differences from the official code, all deliberate:

* No global monkey-patch of ``reset_parameters``: every module is initialised normally on construction, and
  :meth:`VAR.init_weights` (called by ``build_vae_var``) applies the official VAR initialisation on top.
* :meth:`VAR.autoregressive_infer_cfg` runs in eval mode and restores the previous mode afterwards (the official
  sampler keeps drop-path active when the model is in training mode), and can also return the drawn tokens.
* Class-label dropout (``cond_drop_rate``) is applied in training mode only; the official forward also drops
  labels (and consumes the global RNG) in eval mode.
"""
import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from varcore.ops.attention import BlockCausalMask, scale_visible_end
from varcore.ops.quant import check_patch_nums
from varcore.ops.value_checks import check_range

from .basic_var import AdaLNBeforeHead, AdaLNSelfAttn, autocasting
from .vqvae import VQVAE

__all__ = ["VAR", "SharedAdaLin"]


class SharedAdaLin(nn.Linear):
    """Linear layer whose output (B, 6C) is viewed as the (B, 1, 6, C) modulations shared by all blocks."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


def _check_pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_rate(name: str, value: float, upper_inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1{']' if upper_inclusive else ')'}, got {value}")
    return float(value)


class VAR(nn.Module):
    """Visual AutoRegressive transformer predicting a whole token map per scale.

    Args (as official): ``vae_local`` the VQVAE whose codebook and phis the model uses, ``num_classes`` (class
    ``num_classes`` is the null/unconditional class), ``depth``, ``embed_dim``, ``num_heads``, ``mlp_ratio``,
    ``drop_rate``, ``attn_drop_rate``, ``drop_path_rate`` (linearly increasing over blocks), ``norm_eps``,
    ``shared_aln`` (one AdaLN linear shared by all blocks plus per-block ``ada_gss``), ``cond_drop_rate``
    (class-dropout probability in training, for classifier-free guidance), ``attn_l2_norm``, ``patch_nums`` (the
    scale schedule; it must equal the VAE quantiser's), ``flash_if_available`` and ``fused_if_available``
    (accepted for compatibility; attention goes through :func:`varcore.models.basic_var.attention`).
    """

    def __init__(
        self, vae_local: VQVAE, num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024,
        num_heads: int = 16, mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False, cond_drop_rate: float = 0.1,
        attn_l2_norm: bool = False, patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        flash_if_available: bool = True, fused_if_available: bool = True,
    ):
        super().__init__()
        if not isinstance(vae_local, VQVAE):
            raise TypeError(f"vae_local must be a VQVAE, got {type(vae_local).__name__}")
        for name, value in (("num_classes", num_classes), ("depth", depth), ("embed_dim", embed_dim),
                            ("num_heads", num_heads)):
            _check_pos_int(name, value)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        for name, value in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                            ("drop_path_rate", drop_path_rate)):
            _check_rate(name, value)
        _check_rate("cond_drop_rate", cond_drop_rate, upper_inclusive=True)
        patch_nums = check_patch_nums(patch_nums)
        if len(patch_nums) < 2:
            raise ValueError(f"patch_nums needs at least 2 scales, got {patch_nums}")
        if patch_nums != tuple(vae_local.quantize.v_patch_nums):
            raise ValueError(f"patch_nums {patch_nums} must equal the VAE's v_patch_nums "
                             f"{tuple(vae_local.quantize.v_patch_nums)}")

        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate = cond_drop_rate
        self.patch_nums: Tuple[int, ...] = patch_nums
        self.L = sum(pn * pn for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.begin_ends: List[Tuple[int, int]] = []
        cur = 0
        for pn in patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_stages_minus_1 = len(patch_nums) - 1
        self.prog_si = -1  # progressive training: forward on scales 0..prog_si only (-1: all)
        # The official samplers' generator, reseeded on every call (see varcore.sampling.rng.model_generator).
        self.rng = torch.Generator()

        # The VAE lives in tuples so that its weights stay out of VAR's state dict.
        self.vae_proxy: Tuple[VQVAE] = (vae_local,)
        self.vae_quant_proxy = (vae_local.quantize,)
        self.word_embed = nn.Linear(self.Cvae, self.C)

        init_std = math.sqrt(1 / self.C / 3)
        self.num_classes = num_classes
        # the official attribute, a plain tensor (not a buffer): the uniform class distribution that the samplers
        # draw labels from (varcore.sampling.draw.class_labels)
        self.uniform_prob = torch.full((1, num_classes), fill_value=1.0 / num_classes, dtype=torch.float32,
                                       device="cpu")
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=init_std)
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=init_std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C)) if shared_aln
                               else nn.Identity())
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.drop_path_rate = drop_path_rate
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(
                block_idx=i, last_drop_p=0 if i == 0 else dpr[i - 1], embed_dim=self.C, cond_dim=self.D,
                shared_aln=shared_aln, norm_layer=norm_layer, num_heads=num_heads, mlp_ratio=mlp_ratio,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], attn_l2_norm=attn_l2_norm,
            )
            for i in range(depth)
        ])

        # Block-causal mask for teacher forcing: a token sees its own scale and every earlier one.
        lvl_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])
        self.register_buffer("lvl_1L", lvl_L.view(1, self.L).contiguous())
        mask_LL = torch.where(lvl_L.view(self.L, 1) >= lvl_L.view(1, self.L), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask_LL.view(1, 1, self.L, self.L).contiguous())

        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_layer=norm_layer)
        self.head = nn.Linear(self.C, self.V)

    # ---------------------------------------------------------------- teacher forcing
    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head on the final hidden states: float32 logits (B, L, V). ``cond_BD`` is the raw class embedding."""
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, mask_l: Optional[int] = None
                ) -> torch.Tensor:
        """Teacher-forced logits (B, L, V), or (B, mask_l, V) with ``mask_l``.

        ``label_B`` (B,) class labels; ``x_BLCv_wo_first_l`` (B, L - first_l, Cvae) the next-scale inputs from
        ``vae.quantize.idxBl_to_var_input``. In training mode each label is replaced by the null class with
        probability ``cond_drop_rate``. Under autocast the op sequence and dtypes are the official ones: the
        residual stream runs in the autocast dtype, the class and position embeddings and the logits are float32,
        and ``word_embed`` is outside CUDA autocast only (the official code switches off CUDA autocast there, so
        under CPU autocast it runs in the autocast dtype). ``mask_l`` (CoDe's argument; None = L) keeps only the
        first ``mask_l`` tokens of the sequence, e.g. 255 for the first 8 scales at 256 px (CoDe's drafter
        training): by the block-causal mask their logits are those of the full sequence, at a fraction of the cost.

        Progressive training (official attribute ``prog_si``, -1 by default): with ``prog_si = p >= 0`` the model
        runs on scales ``0..p`` only, ``x_BLCv_wo_first_l`` is the truncated input of scales ``1..p`` that
        ``idxBl_to_var_input`` gives under the same ``prog_si``, and the logits are (B, end of scale p, V). At
        ``p == 0`` the input is not used (as official, only its batch size is read) and, as official, zero
        multiples of ``word_embed``'s first weight and bias are added to one logit so that ``word_embed`` gets a
        (zero) gradient rather than none (DistributedDataParallel and AdamW's weight decay see it).
        """
        prog_si = self.prog_si
        if isinstance(prog_si, bool) or not isinstance(prog_si, int) or not -1 <= prog_si <= self.num_stages_minus_1:
            raise ValueError(f"prog_si must be an int in [-1, {self.num_stages_minus_1}], got {prog_si!r}")
        ed = self.L if prog_si < 0 else self.begin_ends[prog_si][1]
        if prog_si >= 0 and mask_l is not None:
            raise ValueError("mask_l cannot be combined with progressive training (prog_si >= 0)")
        if not isinstance(x_BLCv_wo_first_l, torch.Tensor) or x_BLCv_wo_first_l.ndim != 3 \
                or x_BLCv_wo_first_l.shape[2] != self.Cvae \
                or (prog_si != 0 and x_BLCv_wo_first_l.shape[1] != ed - self.first_l):
            length = "any" if prog_si == 0 else ed - self.first_l
            where = "" if prog_si < 0 else f" at prog_si={prog_si}"
            raise ValueError(f"x_BLCv_wo_first_l must be (B, {length}, {self.Cvae}){where}, "
                             f"got {tuple(getattr(x_BLCv_wo_first_l, 'shape', ()))}")
        B = x_BLCv_wo_first_l.shape[0]
        if not isinstance(label_B, torch.Tensor) or tuple(label_B.shape) != (B,) \
                or label_B.is_floating_point() or label_B.dtype == torch.bool:
            raise ValueError(f"label_B must be an integer tensor of shape ({B},), "
                             f"got {getattr(label_B, 'dtype', type(label_B))} {tuple(getattr(label_B, 'shape', ()))}")
        check_range(label_B, 0, self.num_classes + 1, "label_B")
        if mask_l is None:
            mask_l = ed
        if isinstance(mask_l, bool) or not isinstance(mask_l, int) or not self.first_l <= mask_l <= self.L:
            raise ValueError(f"mask_l must be an int in [{self.first_l}, {self.L}], got {mask_l!r}")
        device = x_BLCv_wo_first_l.device
        label_B = label_B.to(device)

        # as official, only CUDA autocast is switched off here: under CPU autocast word_embed runs in its dtype
        with torch.autocast("cuda", enabled=False):
            if self.training and self.cond_drop_rate > 0:
                drop_B = torch.rand(B, device=device) < self.cond_drop_rate
                label_B = torch.where(drop_B, self.num_classes, label_B)
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            if prog_si == 0:
                x_BLC = sos
            else:
                x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l[:, :mask_l - self.first_l].float())), dim=1)
            x_BLC += self.lvl_embed(self.lvl_1L[:, :mask_l].expand(B, -1)) + self.pos_1LC[:, :mask_l]

        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        main_type = torch.get_autocast_dtype(device.type) if autocasting(device) else x_BLC.dtype
        x_BLC = x_BLC.to(main_type)
        cond_BD_or_gss = cond_BD_or_gss.to(main_type)
        attn_bias = self.block_mask(mask_l)
        for block in self.blocks:
            x_BLC = block(x=x_BLC, cond_BD=cond_BD_or_gss, attn_bias=attn_bias)
        logits_BLV = self.get_logits(x_BLC.float(), cond_BD)
        if prog_si == 0 and B:
            logits_BLV[0, 0, 0] += self.word_embed.weight[0, 0] * 0 + self.word_embed.bias[0] * 0
        return logits_BLV

    def block_mask(self, mask_l: Optional[int] = None) -> BlockCausalMask:
        """``attn_bias_for_masking`` over the first ``mask_l`` tokens (default all L) as "query i sees keys
        ``[0, visible_end[i])``", the form the attention backends take; built once per length and kept (not a
        buffer, so checkpoints keep the official keys)."""
        mask_l = self.L if mask_l is None else mask_l
        masks = self.__dict__.setdefault("_block_masks", {})
        if mask_l not in masks:
            ends = scale_visible_end(self.patch_nums)[:mask_l].clamp(max=mask_l)  # a cut inside a scale
            masks[mask_l] = BlockCausalMask(ends, mask_l)
        return masks[mask_l]

    # ---------------------------------------------------------------- sampling (official method names)
    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, B: int, label_B: Optional[Union[int, torch.LongTensor]], g_seed: Optional[int] = None,
        cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
        return_idx_Bl: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Sample B images in [0, 1], shape (B, 3, H, W), with classifier-free guidance (official semantics).

        ``label_B``: a (B,) LongTensor, an int for all samples (negative = null class), or None to draw labels
        uniformly (the first random draw). ``g_seed`` reseeds ``self.rng`` on every call; None uses the global RNG.
        At scale si the guidance weight is ``t = cfg * si / (SN - 1)`` and the logits are
        ``(1 + t) * cond - t * uncond``. ``top_k``/``top_p`` filter the logits in place before one multinomial draw
        per scale; ``more_smooth`` then replaces the drawn codes by a Gumbel-softmax mixture of code vectors (for
        visualisation; it draws more random numbers). The same seed, batch size and device give the same images.

        Unlike the official sampler this runs in eval mode and restores the previous mode afterwards, so drop-path
        and dropout are never active here. With ``return_idx_Bl=True`` it returns ``(images, idx_Bl)`` where
        ``idx_Bl`` holds the (B, pn^2) tokens drawn at each scale. See
        :func:`varcore.sampling.var.autoregressive_infer_cfg`.
        """
        from varcore.sampling.var import autoregressive_infer_cfg

        return autoregressive_infer_cfg(self, B, label_B, g_seed, cfg, top_k, top_p, more_smooth, return_idx_Bl)

    def autoregressive_infer_cfg_draft(self, B: int, label_B, g_seed: Optional[int] = None, cfg: float = 1.5,
                                       top_k=0, top_p: float = 0.0, more_smooth: bool = False, exit_num: int = 7,
                                       temp=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """CoDe's drafter half: scales ``0..exit_num-1``; returns ``(f_hat, token_hub)`` as the official method
        (see :func:`varcore.sampling.code.draft`). ``top_k``/``temp`` are scalars or one value per scale."""
        from varcore.sampling.code import draft

        return draft(self, B, label_B, exit_num, g_seed, cfg, top_k, top_p, more_smooth, temp)[:2]

    def autoregressive_infer_cfg_refine(self, B: int, label_B, g_seed: Optional[int] = None, cfg: float = 1.5,
                                        top_k=0, top_p: float = 0.0, more_smooth: bool = False, draft=None,
                                        f_hat=None, entry_num: int = 7, temp=1.0) -> torch.Tensor:
        """CoDe's refiner half on the drafter's ``draft`` (token hub) and ``f_hat``: images in [0, 1], with the
        official replay of the drafted scales' random draws (see :func:`varcore.sampling.code.refine`)."""
        from varcore.sampling.code import refine

        return refine(self, B, label_B, draft, f_hat, entry_num, g_seed, cfg, top_k, top_p, more_smooth, temp)[0]

    # ---------------------------------------------------------------- initialisation
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = 0.02, conv_std_or_gain: float = 0.02) -> None:
        """The official VAR initialisation (``build_vae_var`` calls it with ``init_std=-1``).

        Linear and Embedding weights ~ trunc_normal(0, init_std) (``init_std < 0`` means sqrt(1 / (3C))) with zero
        biases, LayerNorm-type affine weights 1 and biases 0, convs trunc_normal(conv_std_or_gain) (or Xavier with
        gain -conv_std_or_gain when negative). Then the head is scaled by ``init_head``, the final AdaLN by
        ``init_adaln``, each block's attention and FFN output projections by 1/sqrt(2 depth), and each block's
        AdaLN rows by ``init_adaln`` (scales and shifts) and ``init_adaln_gamma`` (gammas).
        """
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                      nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
        conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        with torch.no_grad():
            for m in self.modules():
                weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=init_std)
                    if bias is not None:
                        bias.zero_()
                elif isinstance(m, nn.Embedding):
                    nn.init.trunc_normal_(m.weight, std=init_std)
                    if m.padding_idx is not None:
                        m.weight[m.padding_idx].zero_()
                elif isinstance(m, norm_types):
                    if weight is not None:
                        weight.fill_(1.0)
                    if bias is not None:
                        bias.zero_()
                elif isinstance(m, conv_types):
                    if conv_std_or_gain > 0:
                        nn.init.trunc_normal_(m.weight, std=conv_std_or_gain)
                    else:
                        nn.init.xavier_normal_(m.weight, gain=-conv_std_or_gain)
                    if bias is not None:
                        bias.zero_()

            if init_head >= 0:
                self.head.weight.mul_(init_head)
                self.head.bias.zero_()
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            self.head_nm.ada_lin[-1].bias.zero_()
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
                if block.shared_aln:
                    block.ada_gss[:, :, 2:].mul_(init_adaln)
                    block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
                else:
                    block.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)
                    block.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)
                    block.ada_lin[-1].bias.zero_()

    def extra_repr(self) -> str:
        return f"drop_path_rate={self.drop_path_rate:g}"
