"""Bad input, one table: every public function and op refuses wrong shapes, dtypes, devices, layouts, empty
batches, out-of-range labels and token indices, bad sampling options, non-finite logits, a patch schedule that does
not fit the model and mismatched CoDe pairs, with a ValueError/TypeError whose message names the argument.

Each row is (id, call, exception type, pattern the message must match). The pattern always holds the argument's
name; rows for the compiled ops run on the kernel (the meta device stands in for "another device")."""
import math
import re
import types

import pytest
import torch

from varcore import checkpoints
from varcore.models import VAR, VQVAE
from varcore.models.code import collaborative_infer_cfg
from varcore.models.gpt import ModelArgs, Transformer, generate
from varcore.ops import attention as att, par_order as po, quant as q
from varcore.sampling.code import CoDeSampler
from varcore.sampling.draw import gumbel_softmax_with_rng, sample_with_top_k_top_p_, top_k_top_p_filter_
from varcore.sampling.par import PARSampler
from varcore.sampling.var import VARSampler
from varcore.train.gpt_trainer import GPTTrainer, to_par_order
from varcore.train.var_trainer import TrainConfig, VARTrainer

PN = (1, 2, 3)
V, CLASSES = 16, 4


@pytest.fixture(scope="module")
def m():
    """Small models: a VAE, a VAR, a second VAR on the same VAE (refiner), VARs on other token spaces, a GPT."""
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=V, z_channels=4, ch=32, share_quant_resi=4, v_patch_nums=PN, ch_mult=(1, 1))
    var = VAR(vae, num_classes=CLASSES, depth=2, embed_dim=32, num_heads=2, patch_nums=PN).eval()
    small = VAR(vae, num_classes=CLASSES, depth=1, embed_dim=32, num_heads=2, patch_nums=PN).eval()
    other_vae = VQVAE(vocab_size=V + 4, z_channels=4, ch=32, v_patch_nums=PN, ch_mult=(1, 1))
    other_vocab = VAR(other_vae, num_classes=CLASSES, depth=1, embed_dim=32, num_heads=2, patch_nums=PN)
    other_pn_vae = VQVAE(vocab_size=V, z_channels=4, ch=32, v_patch_nums=(1, 2, 4), ch_mult=(1, 1))
    other_pn = VAR(other_pn_vae, num_classes=CLASSES, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2, 4))
    other_classes = VAR(vae, num_classes=CLASSES + 1, depth=1, embed_dim=32, num_heads=2, patch_nums=PN)
    gpt = Transformer(ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=V, num_classes=CLASSES, block_size=16,
                                spe_token_num=3, ar_token_num=4)).eval()
    return types.SimpleNamespace(vae=vae, var=var, small=small, other_vocab=other_vocab, other_pn=other_pn,
                                 other_classes=other_classes, gpt=gpt, codebook=vae.quantize.embedding.weight.detach(),
                                 phis=vae.quantize.phis_for(len(PN)))


def _qkv(Lq=4, Lk=4, D=8, dtype=torch.float32):
    return torch.randn(1, 2, Lq, D, dtype=dtype), torch.randn(1, 2, Lk, D, dtype=dtype), \
        torch.randn(1, 2, Lk, D, dtype=dtype)


def _attn(**change):
    qq, k, v = _qkv()
    args = dict(q=qq, k=k, v=v, visible_end=torch.full((4,), 4, dtype=torch.int32), scale=None, layout="bhld")
    args.update(change)
    return lambda m: att.block_causal_attention(**args)


def _idx_pyramid(B=2, poke=None, dtype=torch.long):
    idx = [torch.randint(0, V, (B, pn * pn)).to(dtype) for pn in PN]
    if poke is not None:
        idx[-1][0, 0] = poke
    return idx


NAN = float("nan")

ROWS = [
    # ----------------------------------------------------------------- PAR order ops
    ("par_gather x not a tensor", lambda m: po.par_gather([[1]], 1), TypeError, r"\bx\b"),
    ("par_gather x wrong rank", lambda m: po.par_gather(torch.zeros(4, 4), 2), ValueError, r"\bx must be \(B, G, G"),
    ("par_gather x not square", lambda m: po.par_gather(torch.zeros(1, 4, 2), 2), ValueError, r"\bx must hold a square"),
    ("par_gather M does not divide", lambda m: po.par_gather(torch.zeros(1, 6, 6), 4), ValueError, r"\bM\b"),
    ("par_gather M not int", lambda m: po.par_gather(torch.zeros(1, 4, 4), 2.0), TypeError, r"\bM\b"),
    ("par_gather M zero", lambda m: po.par_gather(torch.zeros(1, 4, 4), 0), ValueError, r"\bM\b"),
    ("par_scatter L not square", lambda m: po.par_scatter(torch.zeros(1, 15), 1), ValueError, r"\bL=15"),
    ("par_scatter x wrong rank", lambda m: po.par_scatter(torch.zeros(16), 2), ValueError, r"\bx must be \(B, L"),
    ("par_group_scatter_ group out of range",
     lambda m: po.par_group_scatter_(torch.zeros(1, 4, 4), torch.zeros(1, 4), 4, 2), ValueError, r"\bgroup\b"),
    ("par_group_scatter_ tokens dtype",
     lambda m: po.par_group_scatter_(torch.zeros(1, 4, 4), torch.zeros(1, 4, dtype=torch.long), 0, 2), TypeError,
     r"\btokens dtype"),
    ("par_group_scatter_ tokens shape",
     lambda m: po.par_group_scatter_(torch.zeros(1, 4, 4), torch.zeros(1, 3), 0, 2), ValueError, r"\btokens must"),
    ("par_group_scatter_ canvas not contiguous",
     lambda m: po.par_group_scatter_(torch.zeros(1, 4, 4).transpose(1, 2), torch.zeros(1, 4), 0, 2), ValueError,
     r"\bcanvas must be contiguous"),
    ("par_group_scatter_ tokens on another device",
     lambda m: po.par_group_scatter_(torch.zeros(1, 4, 4), torch.zeros(1, 4, device="meta"), 0, 2), ValueError,
     r"\btokens on meta"),
    ("par_permutation M does not divide", lambda m: po.par_permutation(5, 2), ValueError, r"\bM=2"),
    ("to_par_order codes not square", lambda m: to_par_order(torch.zeros(2, 15, dtype=torch.long), 2), ValueError,
     r"\bcodes\b"),
    # ----------------------------------------------------------------- attention
    ("attention q not a tensor", _attn(q=None), TypeError, r"\bq must be a torch.Tensor"),
    ("attention q wrong rank", _attn(q=torch.zeros(2, 4, 8)), ValueError, r"\bq must be 4-D"),
    ("attention integer q", _attn(q=torch.zeros(1, 2, 4, 8, dtype=torch.long)), TypeError, r"\bq must be float"),
    ("attention k dtype", _attn(k=torch.zeros(1, 2, 4, 8, dtype=torch.float64)), TypeError, r"\bq, k and v must share"),
    ("attention k on another device", _attn(k=torch.zeros(1, 2, 4, 8, device="meta")), ValueError, r"\bk is on meta"),
    ("attention head counts", _attn(k=torch.zeros(1, 3, 4, 8)), ValueError, r"\bq, k and v must have the same batch"),
    ("attention head dim", _attn(v=torch.zeros(1, 2, 4, 7)), ValueError, r"\bhead dim"),
    ("attention v length", _attn(v=torch.zeros(1, 2, 5, 8)), ValueError, r"\bk and v must have the same length"),
    ("attention visible_end float", _attn(visible_end=torch.full((4,), 4.0)), TypeError, r"\bvisible_end must be int"),
    ("attention visible_end shape", _attn(visible_end=torch.full((3,), 4)), ValueError, r"\bvisible_end must have shape"),
    ("attention visible_end beyond Lk", _attn(visible_end=torch.tensor([1, 2, 3, 5])), ValueError,
     r"\bvisible_end values must be in \[0, Lk\]"),
    ("attention visible_end negative", _attn(visible_end=torch.tensor([-1, 2, 3, 4])), ValueError, r"\bvisible_end"),
    ("attention scale nan", _attn(scale=NAN), TypeError, r"\bscale must be a finite"),
    ("attention layout", _attn(layout="bld"), ValueError, r"\blayout must be"),
    ("attend layout", lambda m: att.attend(*_qkv(), layout="x"), ValueError, r"\blayout"),
    ("scale_visible_end patch_nums", lambda m: att.scale_visible_end([1, 0]), ValueError, r"\bpatch_nums\b"),
    ("scale_visible_end first_query_scale", lambda m: att.scale_visible_end([1, 2], 2), ValueError,
     r"\bfirst_query_scale\b"),
    ("code_prefill_visible_end draft_steps", lambda m: att.code_prefill_visible_end(PN, 3), ValueError,
     r"\bdraft_steps\b"),
    ("code_prefill_visible_end cached_scales", lambda m: att.code_prefill_visible_end(PN, 1, 2), ValueError,
     r"\bcached_scales\b"),
    ("par_visible_end M", lambda m: att.par_visible_end(16, 0), ValueError, r"\bM\b"),
    # ----------------------------------------------------------------- quantiser ops
    ("nearest_code z not a tensor", lambda m: q.nearest_code([1.0], m.codebook), TypeError, r"\bz_NC\b"),
    ("nearest_code z channels", lambda m: q.nearest_code(torch.zeros(3, 5), m.codebook), ValueError, r"\bz_NC\b"),
    ("nearest_code codebook integer", lambda m: q.nearest_code(torch.zeros(3, 4), torch.zeros(16, 4).long()),
     ValueError, r"\bcodebook_VC must be a floating"),
    ("nearest_code device", lambda m: q.nearest_code(torch.zeros(3, 4, device="meta"), m.codebook), ValueError,
     r"\bz_NC on meta"),
    ("upsample_sum idx out of range", lambda m: q.upsample_sum(_idx_pyramid(poke=V), m.codebook, m.phis, PN),
     ValueError, r"\bidx_Bl\[2\] values must be in \[0, 16\)"),
    ("upsample_sum negative idx", lambda m: q.upsample_sum(_idx_pyramid(poke=-1), m.codebook, m.phis, PN),
     ValueError, r"\bidx_Bl\[2\] values"),
    ("upsample_sum float idx",
     lambda m: q.upsample_sum(_idx_pyramid(dtype=torch.float32), m.codebook, m.phis, PN), ValueError,
     r"\bidx_Bl\[0\] must be an integer"),
    ("upsample_sum wrong scale count", lambda m: q.upsample_sum(_idx_pyramid()[:2], m.codebook, m.phis, PN),
     ValueError, r"\bidx_Bl must hold 3 scales"),
    ("upsample_sum phis count", lambda m: q.upsample_sum(_idx_pyramid(), m.codebook, m.phis[:2], PN), ValueError,
     r"\bphis must hold"),
    ("upsample_sum patch_nums zero", lambda m: q.upsample_sum(_idx_pyramid(), m.codebook, m.phis, (1, 2, 0)),
     ValueError, r"\bpatch_nums\b"),
    ("idxBl_to_var_input idx out of range",
     lambda m: m.vae.quantize.idxBl_to_var_input(_idx_pyramid(poke=None)[:1] + [torch.full((2, 4), V)]),
     ValueError, r"\bgt_ms_idx_Bl\[1\] values"),
    ("idxBl_to_var_input shape",
     lambda m: m.vae.quantize.idxBl_to_var_input([torch.zeros(2, 2).long(), torch.zeros(2, 4).long()]),
     ValueError, r"\bgt_ms_idx_Bl\[0\] must have shape"),
    ("idxBl_to_var_input one tensor", lambda m: m.vae.quantize.idxBl_to_var_input(torch.zeros(2, 4).long()),
     TypeError, r"\bgt_ms_idx_Bl must be a list"),
    ("msrq_encode f not 4-D", lambda m: q.msrq_encode(torch.zeros(2, 4, 3), m.codebook, m.phis, PN, False),
     ValueError, r"\bf_BChw\b"),
    ("msrq_encode schedule does not fit f",
     lambda m: q.msrq_encode(torch.zeros(1, 4, 4, 4), m.codebook, m.phis, PN, False), ValueError,
     r"\bpatch_nums\b"),
    ("msrq_encode channels", lambda m: q.msrq_encode(torch.zeros(1, 5, 3, 3), m.codebook, m.phis, PN, False),
     ValueError, r"\bf_BChw has 5 channels"),
    ("embed_to_fhat scale count", lambda m: m.vae.quantize.embed_to_fhat([torch.zeros(1, 4, 1, 1)]), ValueError,
     r"\bms_h_BChw must hold 3"),
    ("embed_to_fhat map size",
     lambda m: m.vae.quantize.embed_to_fhat([torch.zeros(1, 4, pn + (si == 1), pn) for si, pn in enumerate(PN)]),
     ValueError, r"\bms_h_BChw\[1\] must have shape \(B, 4, 2, 2\)"),
    ("add_scale_ si",
     lambda m: q.add_scale_(3, torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 3), m.phis, PN),
     ValueError, r"\bsi must be an int in"),
    # ----------------------------------------------------------------- models
    ("VQVAE ch", lambda m: VQVAE(ch=48), ValueError, r"\bch must be a multiple of 32"),
    ("VQVAE vocab_size", lambda m: VQVAE(vocab_size=0), ValueError, r"\bvocab_size\b"),
    ("VAR patch_nums differ from the VAE's", lambda m: VAR(m.vae, depth=1, embed_dim=32, num_heads=2,
                                                           patch_nums=(1, 2, 4)), ValueError, r"\bpatch_nums\b"),
    ("VAR embed_dim vs heads", lambda m: VAR(m.vae, depth=1, embed_dim=30, num_heads=4, patch_nums=PN), ValueError,
     r"\bembed_dim\b"),
    ("VAR forward label out of range",
     lambda m: m.var(torch.tensor([CLASSES + 1, 0]), torch.zeros(2, 13, 4)), ValueError, r"\blabel_B\b"),
    ("VAR forward x shape", lambda m: m.var(torch.tensor([0, 1]), torch.zeros(2, 12, 4)), ValueError,
     r"\bx_BLCv_wo_first_l\b"),
    ("VAR forward batch mismatch", lambda m: m.var(torch.tensor([0]), torch.zeros(2, 13, 4)), ValueError,
     r"\blabel_B\b"),
    ("autoregressive_infer_cfg empty batch", lambda m: m.var.autoregressive_infer_cfg(0, 1), ValueError, r"\bB\b"),
    ("autoregressive_infer_cfg label", lambda m: m.var.autoregressive_infer_cfg(2, CLASSES + 1), ValueError,
     r"\blabel_B\b"),
    ("autoregressive_infer_cfg label tensor",
     lambda m: m.var.autoregressive_infer_cfg(2, torch.tensor([0, 9])), ValueError, r"\blabel_B values"),
    ("autoregressive_infer_cfg float labels",
     lambda m: m.var.autoregressive_infer_cfg(2, torch.tensor([0.0, 1.0])), ValueError, r"\blabel_B\b"),
    ("autoregressive_infer_cfg cfg", lambda m: m.var.autoregressive_infer_cfg(1, 0, cfg=-1.0), ValueError, r"\bcfg\b"),
    ("autoregressive_infer_cfg top_k", lambda m: m.var.autoregressive_infer_cfg(1, 0, top_k=-1), ValueError,
     r"\btop_k\b"),
    ("autoregressive_infer_cfg top_k > V", lambda m: m.var.autoregressive_infer_cfg(1, 0, top_k=V + 1), ValueError,
     r"\btop_k\b"),
    ("autoregressive_infer_cfg top_p", lambda m: m.var.autoregressive_infer_cfg(1, 0, top_p=1.5), ValueError,
     r"\btop_p\b"),
    ("img_to_idxBl image size", lambda m: m.vae.img_to_idxBl(torch.zeros(1, 3, 5, 5)), ValueError, r"\binp_img"),
    ("img_to_idxBl channels", lambda m: m.vae.img_to_idxBl(torch.zeros(1, 1, 6, 6)), ValueError, r"\binp_img"),
    ("idxBl_to_img idx out of range", lambda m: m.vae.idxBl_to_img(_idx_pyramid(poke=V), same_shape=True), ValueError,
     r"\bms_idx_Bl\[2\] values"),
    ("GPT forward idx float", lambda m: m.gpt(idx=torch.zeros(1, 15), cond_idx=torch.tensor([1])), TypeError,
     r"\bidx\b"),
    ("GPT forward batch mismatch",
     lambda m: m.gpt(idx=torch.zeros(2, 15, dtype=torch.long), cond_idx=torch.tensor([1])), ValueError, r"\bidx and "
                                                                                                      r"cond_idx"),
    ("GPT forward too many tokens",
     lambda m: m.gpt(idx=torch.zeros(1, 16, dtype=torch.long), cond_idx=torch.tensor([1])), ValueError, r"\bidx must "
                                                                                                        r"hold"),
    ("generate max_new_tokens", lambda m: generate(m.gpt, torch.tensor([1]), 15), ValueError, r"\bmax_new_tokens\b"),
    # ----------------------------------------------------------------- samplers and filters
    ("VARSampler var", lambda m: VARSampler(m.gpt), TypeError, r"\bvar must be"),
    ("VARSampler dtype", lambda m: VARSampler(m.var, dtype=torch.int8), ValueError, r"\bdtype must be"),
    ("VARSampler decode_batch", lambda m: VARSampler(m.var, decode_batch=0), ValueError, r"\bdecode_batch\b"),
    ("VARSampler empty batch", lambda m: VARSampler(m.var).sample(0, 1), ValueError, r"\bB must be >= 1"),
    ("VARSampler label", lambda m: VARSampler(m.var).sample(2, torch.tensor([0, CLASSES + 1])), ValueError,
     r"\blabel_B values"),
    ("VARSampler cfg negative", lambda m: VARSampler(m.var).sample(1, 0, cfg=-0.5), ValueError, r"\bcfg\b"),
    ("VARSampler cfg nan", lambda m: VARSampler(m.var).sample(1, 0, cfg=NAN), ValueError, r"\bcfg\b"),
    ("VARSampler top_k negative", lambda m: VARSampler(m.var).sample(1, 0, top_k=-1), ValueError, r"\btop_k\b"),
    ("VARSampler top_k > V", lambda m: VARSampler(m.var).sample(1, 0, top_k=V + 1), ValueError, r"\btop_k\b"),
    ("VARSampler top_p", lambda m: VARSampler(m.var).sample(1, 0, top_p=-0.1), ValueError, r"\btop_p\b"),
    ("VARSampler temperature zero", lambda m: VARSampler(m.var).sample(1, 0, temperature=0.0), ValueError,
     r"\btemperature\b"),
    ("VARSampler temperature inf", lambda m: VARSampler(m.var).sample(1, 0, temperature=math.inf), ValueError,
     r"\btemperature\b"),
    ("VARSampler per-scale top_k count", lambda m: VARSampler(m.var).sample(1, 0, top_k=[1, 2]), ValueError,
     r"\btop_k\b"),
    ("VARSampler seeds count", lambda m: VARSampler(m.var).sample(2, 0, seeds=[1]), ValueError, r"\bseeds\b"),
    ("VARSampler output", lambda m: VARSampler(m.var).sample(1, 0, output="png"), ValueError, r"\boutput\b"),
    ("VARSampler generator type", lambda m: VARSampler(m.var).sample(1, 0, generator=7), TypeError,
     r"\bgenerator must be a torch.Generator"),
    ("VARSampler VAE with another schedule", lambda m: VARSampler(m.var, m.other_pn.vae_proxy[0]), ValueError,
     r"\bvae\b"),
    ("top_k_top_p_filter_ top_k", lambda m: top_k_top_p_filter_(torch.zeros(1, 1, 8), top_k=-2), ValueError,
     r"\btop_k\b"),
    ("top_k_top_p_filter_ top_k > V", lambda m: top_k_top_p_filter_(torch.zeros(1, 1, 8), top_k=9), ValueError,
     r"\btop_k\b"),
    ("top_k_top_p_filter_ top_p", lambda m: top_k_top_p_filter_(torch.zeros(1, 1, 8), top_p=2.0), ValueError,
     r"\btop_p\b"),
    ("sample_with_top_k_top_p_ nan logits",
     lambda m: sample_with_top_k_top_p_(torch.tensor([[[0.0, NAN, 1.0]]])), ValueError, r"\blogits_BlV\b"),
    ("sample_with_top_k_top_p_ inf logits",
     lambda m: sample_with_top_k_top_p_(torch.tensor([[[0.0, math.inf, 1.0]]])), ValueError, r"\blogits_BlV\b"),
    ("sample_with_top_k_top_p_ shape", lambda m: sample_with_top_k_top_p_(torch.zeros(2, 8)), ValueError,
     r"\blogits_BlV must be"),
    ("gumbel_softmax tau", lambda m: gumbel_softmax_with_rng(torch.zeros(2, 3), tau=0.0), ValueError, r"\btau\b"),
    ("PARSampler model", lambda m: PARSampler(m.var), TypeError, r"\bmodel must be"),
    ("PARSampler M mismatch", lambda m: PARSampler(m.gpt, M=1), ValueError, r"\bM=1"),
    ("PARSampler labels range", lambda m: PARSampler(m.gpt).sample_tokens([0, CLASSES]), ValueError, r"\blabels\b"),
    ("PARSampler empty labels", lambda m: PARSampler(m.gpt).sample_tokens(torch.zeros(0, dtype=torch.long)),
     ValueError, r"\blabels\b"),
    ("PARSampler cfg", lambda m: PARSampler(m.gpt).sample_tokens([0], cfg_scale=-1.0), ValueError, r"\bcfg_scale\b"),
    ("PARSampler top_k", lambda m: PARSampler(m.gpt).sample_tokens([0], top_k=-1), ValueError, r"\btop_k\b"),
    ("PARSampler top_k > V", lambda m: PARSampler(m.gpt).sample_tokens([0], top_k=V + 1), ValueError, r"\btop_k\b"),
    ("PARSampler top_p", lambda m: PARSampler(m.gpt).sample_tokens([0], top_p=1.01), ValueError, r"\btop_p\b"),
    ("PARSampler temperature", lambda m: PARSampler(m.gpt).sample_tokens([0], temperature=0.0), ValueError,
     r"\btemperature\b"),
    ("PARSampler sample without vq", lambda m: PARSampler(m.gpt).sample([0]), ValueError, r"\bvq\b"),
    # ----------------------------------------------------------------- CoDe
    ("CoDe vocabularies differ", lambda m: collaborative_infer_cfg(m.var, m.other_vocab, 1, 0, 1), ValueError,
     r"vocabularies differ: drafter V=16, refiner V=20"),
    ("CoDe schedules differ", lambda m: collaborative_infer_cfg(m.var, m.other_pn, 1, 0, 1), ValueError,
     r"scale schedules differ: drafter"),
    ("CoDe classes differ", lambda m: collaborative_infer_cfg(m.var, m.other_classes, 1, 0, 1), ValueError,
     r"class counts differ: drafter"),
    ("CoDe refiner not a VAR", lambda m: collaborative_infer_cfg(m.var, m.gpt, 1, 0, 1), TypeError,
     r"\brefiner must be"),
    ("CoDe draft_steps", lambda m: collaborative_infer_cfg(m.var, m.small, 1, 0, 3), ValueError, r"\bdraft_steps\b"),
    ("CoDe cfg", lambda m: collaborative_infer_cfg(m.var, m.small, 1, 0, 1, cfg=-2.0), ValueError, r"\bcfg\b"),
    ("CoDe top_k > V", lambda m: collaborative_infer_cfg(m.var, m.small, 1, 0, 1, top_k=V + 1), ValueError,
     r"\btop_k\b"),
    ("CoDeSampler pair", lambda m: CoDeSampler(m.var, m.other_vocab, 1), ValueError, r"\bdrafter\b"),
    ("CoDeSampler draft_steps", lambda m: CoDeSampler(m.var, m.small, 0), ValueError, r"\bdraft_steps\b"),
    ("CoDeSampler cfg", lambda m: CoDeSampler(m.var, m.small, 1).sample(1, 0, cfg=-1.0), ValueError, r"\bcfg\b"),
    ("CoDeSampler temperature", lambda m: CoDeSampler(m.var, m.small, 1).sample(1, 0, temperature=0.0), ValueError,
     r"\btemperature\b"),
    # ----------------------------------------------------------------- checkpoints and training
    ("read_state_dict kind", lambda m: checkpoints.read_state_dict({}, kind="vq"), ValueError, r"\bkind must be"),
    ("read_state_dict not tensors", lambda m: checkpoints.read_state_dict({"a": 1}), ValueError, r"not a state dict"),
    ("load_var vae", lambda m: checkpoints.load_var({}, vae=m.var), TypeError, r"\bvae must be a VQVAE"),
    ("load_var schedule does not match the VAE",
     lambda m: checkpoints.load_var(m.other_pn.state_dict(), m.vae), ValueError, r"\bpatch_nums\b"),
    ("from_pretrained name", lambda m: checkpoints.from_pretrained("var-d17"), ValueError, r"\bname must be one of"),
    ("TrainConfig max_iters", lambda m: TrainConfig(max_iters=0), ValueError, r"\bmax_iters\b"),
    ("TrainConfig lr", lambda m: TrainConfig(max_iters=1, lr=-1.0), ValueError, r"\blr\b"),
    ("TrainConfig amp", lambda m: TrainConfig(max_iters=1, amp="fp8"), ValueError, r"\bamp\b"),
    ("VARTrainer var on another VAE", lambda m: VARTrainer(m.vae, m.other_pn, TrainConfig(max_iters=1)), ValueError,
     r"\bvar must have been built on this vae"),
    ("VARTrainer scale count",
     lambda m: VARTrainer(m.vae, m.var, TrainConfig(max_iters=1)).train_step(torch.tensor([0, 1]),
                                                                             idx_Bl=_idx_pyramid()[:2]),
     ValueError, r"\bidx_Bl must hold 3 scales"),
    ("VARTrainer token out of range",
     lambda m: VARTrainer(m.vae, m.var, TrainConfig(max_iters=1)).train_step(torch.tensor([0, 1]),
                                                                             idx_Bl=_idx_pyramid(poke=V)),
     ValueError, r"\bidx_Bl\[2\] values"),
    ("VARTrainer label out of range",
     lambda m: VARTrainer(m.vae, m.var, TrainConfig(max_iters=1)).train_step(torch.tensor([0, 9]),
                                                                             idx_Bl=_idx_pyramid()),
     ValueError, r"\blabel_B\b"),
    ("GPTTrainer codes length",
     lambda m: GPTTrainer(m.gpt, TrainConfig(max_iters=1)).train_step(torch.tensor([0]), torch.zeros(1, 4, 4).long()[
         :, :2, :2]), ValueError, r"\bcodes\b"),
    ("GPTTrainer token out of range",
     lambda m: GPTTrainer(m.gpt, TrainConfig(max_iters=1)).train_step(torch.tensor([0]), torch.full((1, 16), V)),
     ValueError, r"\bcodes\b|\bidx\b"),
]


@pytest.mark.parametrize("call,exc,pattern", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_by_name(m, call, exc, pattern):
    with pytest.raises(exc) as err:
        call(m)
    assert re.search(pattern, str(err.value)), f"message does not name the argument: {err.value}"


def test_table_covers_the_ops_and_entry_points():
    """The ops of the quantiser, attention and PAR families (through their public wrappers; the kernels' own
    checks are fuzzed in test_fuzz_ops.py) and every public sampling/model entry point have rows."""
    covered = " ".join(r[0] for r in ROWS)
    wrappers = {"par_gather": "par_gather", "par_scatter": "par_scatter", "par_group_scatter_": "par_group_scatter_",
                "block_causal_attention": "attention", "nearest_code": "nearest_code", "upsample_sum": "upsample_sum",
                "msrq_encode": "msrq_encode", "add_scale_": "add_scale_"}
    for op, row in wrappers.items():
        assert row in covered, f"no bad-input row for op {op}"
    for name in ("VARSampler", "PARSampler", "CoDeSampler", "CoDe ", "autoregressive_infer_cfg", "GPT forward",
                 "VAR forward", "load_var", "VARTrainer", "GPTTrainer", "TrainConfig", "img_to_idxBl"):
        assert name in covered, f"no bad-input row for {name}"
