"""VAR transformer: sizes of the released configs, mask, KV cache, sampler behaviour, init, argument checks."""
import pytest
import torch
import torch.nn as nn

import varcore
from varcore.models import PATCH_NUMS, VAR, VAR_CONFIGS, VQVAE, build_vae_var
from varcore.models.basic_var import SelfAttention, attention
from varcore.sampling.draw import gumbel_softmax_with_rng, sample_with_top_k_top_p_, top_k_top_p_filter_

# spec/var.md 2.2: parameter counts in millions (two decimals), worked out from the official architecture
SPEC_PARAMS_M = {"d16": 310.28, "d20": 600.92, "d24": 1033.40, "d30": 2010.02, "d36": 2353.89}
PNS = (1, 2, 3, 4)


def tiny(shared_aln=False, drop_path_rate=0.0, cond_drop_rate=0.0, num_classes=5, seed=0):
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)
    var = VAR(vae, num_classes=num_classes, depth=2, embed_dim=64, num_heads=2, drop_path_rate=drop_path_rate,
              shared_aln=shared_aln, cond_drop_rate=cond_drop_rate, attn_l2_norm=True, patch_nums=PNS)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0, init_std=-1)
    return vae, var


def teacher_input(vae, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx_Bl = [torch.randint(0, vae.vocab_size, (B, pn * pn), generator=g) for pn in PNS]
    return idx_Bl, vae.quantize.idxBl_to_var_input(idx_Bl)


# ---------------------------------------------------------------- released configs (meta device)
@pytest.mark.parametrize("name", sorted(SPEC_PARAMS_M))
def test_parameter_counts_match_spec(name):
    _, var = VAR_CONFIGS[name].build(torch.device("meta"))
    n = sum(p.numel() for p in var.parameters())
    assert round(n / 1e6, 2) == pytest.approx(SPEC_PARAMS_M[name], abs=1e-6)
    assert var.depth == var.num_heads == VAR_CONFIGS[name].depth and var.C == 64 * var.depth


def test_state_dict_key_order_and_buffers():
    _, var = VAR_CONFIGS["d16"].build(torch.device("meta"))
    keys = list(var.state_dict())
    assert keys[:8] == ["pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking", "word_embed.weight",
                        "word_embed.bias", "class_emb.weight", "lvl_embed.weight"]
    assert keys[8:13] == ["blocks.0.attn.scale_mul_1H11", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
                          "blocks.0.attn.zero_k_bias", "blocks.0.attn.mat_qkv.weight"]
    assert keys[-6:] == ["blocks.15.ada_lin.1.weight", "blocks.15.ada_lin.1.bias", "head_nm.ada_lin.1.weight",
                         "head_nm.ada_lin.1.bias", "head.weight", "head.bias"]
    assert not any(k.startswith("vae") for k in keys)


def test_d36_512_schedule_shapes():
    vae, var = VAR_CONFIGS["d36"].build(torch.device("meta"))
    assert var.patch_nums == PATCH_NUMS[512] and var.L == 2240
    sd = var.state_dict()
    assert sd["shared_ada_lin.1.weight"].shape == (6 * 2304, 2304) and sd["blocks.0.ada_gss"].shape == (1, 1, 6, 2304)
    assert "blocks.0.ada_lin.1.weight" not in sd and sd["attn_bias_for_masking"].shape == (1, 1, 2240, 2240)
    idx_Bl = vae.img_to_idxBl(torch.empty(2, 3, 512, 512, device="meta"))
    assert [t.shape[1] for t in idx_Bl] == [pn * pn for pn in PATCH_NUMS[512]]
    x = vae.quantize.idxBl_to_var_input(idx_Bl)
    assert x.shape == (2, 2239, 32)
    assert var(torch.zeros(2, dtype=torch.long, device="meta"), x).shape == (2, 2240, 4096)
    assert vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).shape == (2, 3, 512, 512)


def test_build_vae_var_does_not_monkeypatch():
    before = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Conv2d, nn.LayerNorm)}
    build_vae_var(torch.device("meta"), depth=2)
    assert all(cls.reset_parameters is fn for cls, fn in before.items())
    lin = nn.Linear(4, 4)
    assert lin.weight.abs().sum() > 0  # normal torch init still happens


def test_lazy_package_exports():
    assert varcore.VQVAE is VQVAE and varcore.VAR is VAR and varcore.build_vae_var is build_vae_var


def test_official_init():
    vae, var = build_vae_var("cpu", patch_nums=PNS, V=32, Cvae=4, ch=32, depth=2, num_classes=5,
                             init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02)
    C = var.C
    assert var.drop_path_rate == pytest.approx(0.1 * 2 / 24) and var.cond_drop_rate == 0.1
    assert torch.all(var.head.bias == 0) and torch.all(var.blocks[0].ada_lin[1].bias == 0)
    std = (1 / C / 3) ** 0.5
    w = var.blocks[1].ada_lin[1].weight
    assert w[:2 * C].std() < 1e-2 * w[2 * C:].std()  # gammas are scaled by init_adaln_gamma
    assert var.head.weight.std() < 0.1 * std
    assert var.blocks[0].attn.scale_mul_1H11.exp().allclose(torch.full((1, 2, 1, 1), 4.0))


# ---------------------------------------------------------------- mask, forward, cache
def test_mask_is_block_causal():
    _, var = tiny()
    mask = var.attn_bias_for_masking[0, 0]
    lvl = var.lvl_1L[0]
    assert lvl.tolist() == [si for si, pn in enumerate(PNS) for _ in range(pn * pn)]
    for (bq, eq), si in zip(var.begin_ends, range(len(PNS))):
        assert torch.all(mask[bq:eq, :eq] == 0)
        assert torch.all(mask[bq:eq, eq:] == -torch.inf)


def test_forward_is_block_causal():
    vae, var = tiny()
    var.eval()
    _, x = teacher_input(vae)
    labels = torch.tensor([1, 3])
    base = var(labels, x)
    assert base.shape == (2, var.L, var.V) and base.dtype == torch.float32
    si = 2  # perturb the input slots of scale 2: scales 0-1 must not change, scale 2 must
    bg, ed = var.begin_ends[si]
    x2 = x.clone()
    x2[:, bg - var.first_l:ed - var.first_l] += 1.0
    out = var(labels, x2)
    torch.testing.assert_close(out[:, :bg], base[:, :bg], atol=1e-6, rtol=0)
    assert (out[:, bg:ed] - base[:, bg:ed]).abs().max() > 1e-4


def test_kv_cache_matches_masked_forward():
    vae, var = tiny(shared_aln=True)
    var.eval()
    _, x = teacher_input(vae)
    labels = torch.tensor([0, 4])
    with torch.no_grad():
        full = var(labels, x)
        cond_BD = var.class_emb(labels)
        h = torch.cat((cond_BD.unsqueeze(1) + var.pos_start, var.word_embed(x)), dim=1)
        h = h + var.lvl_embed(var.lvl_1L) + var.pos_1LC
        cond = var.shared_ada_lin(cond_BD)
        for block in var.blocks:
            block.attn.kv_caching(True)
        outs = []
        for bg, ed in var.begin_ends:
            y = h[:, bg:ed]
            for block in var.blocks:
                y = block(x=y, cond_BD=cond, attn_bias=None)
            outs.append(var.get_logits(y, cond_BD))
        for block in var.blocks:
            block.attn.kv_caching(False)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=0)


def test_official_cached_k_and_cached_v():
    """The official kv_caching attributes: cached_k/v hold what was cached (B, H, l, c); assigning them (as
    KV-pruning forks of the official code do) is what the next call attends over and appends to."""
    torch.manual_seed(0)
    attn = SelfAttention(block_idx=0, embed_dim=16, num_heads=2).eval()
    x1, x4 = torch.randn(2, 1, 16), torch.randn(2, 4, 16)
    assert attn.cached_k is None and attn.cached_v is None
    with pytest.raises(ValueError, match="cached_k"):
        attn.cached_k = torch.zeros(2, 2, 1, 8)
    with torch.no_grad():
        attn.kv_caching(True)
        attn(x1, None)
        first_k, first_v = attn.cached_k.clone(), attn.cached_v.clone()
        out4 = attn(x4, None)
        assert attn.cached_k.shape == attn.cached_v.shape == (2, 2, 5, 8)
        attn.cached_k, attn.cached_v = first_k, first_v  # drop the 4 tokens again
        assert torch.equal(attn(x4, None), out4) and attn.cached_k.shape[2] == 5
        attn.cached_k, attn.cached_v = first_k[:, :, :0], first_v[:, :, :0]  # an empty cache
        alone = attn(x4, None)
        attn.kv_caching(False)
        assert torch.equal(alone, attn(x4, None)) and attn.cached_k is None


def test_attention_function_matches_manual_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    bias = torch.where(torch.rand(1, 1, 5, 7) > 0.3, 0.0, -torch.inf)
    bias[..., 0] = 0.0
    ref = ((q @ k.transpose(-1, -2)) * 0.5 + bias).softmax(-1) @ v
    torch.testing.assert_close(attention(q, k, v, bias, 0.5), ref, atol=1e-5, rtol=0)


def test_class_dropout_only_in_training():
    vae, var = tiny(cond_drop_rate=1.0)
    _, x = teacher_input(vae)
    labels = torch.tensor([1, 2])
    null = torch.full((2,), var.num_classes)
    var.eval()
    assert not torch.allclose(var(labels, x), var(null, x))
    var.train()  # no drop-path in tiny(), so training mode differs only by class dropout
    torch.testing.assert_close(var(labels, x), var(null, x), atol=0, rtol=0)


def test_bf16_autocast_forward_close_to_float32():
    vae, var = tiny()
    var.eval()
    _, x = teacher_input(vae)
    labels = torch.tensor([1, 2])
    ref = var(labels, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = var(labels, x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_save_load_round_trip_strict(tmp_path):
    vae, var = tiny(shared_aln=True)
    path = tmp_path / "var.pth"
    torch.save(var.state_dict(), path)
    vae2, var2 = tiny(shared_aln=True, seed=5)
    vae2.load_state_dict(vae.state_dict(), strict=True)
    assert var2.load_state_dict(torch.load(path, weights_only=True), strict=True) is not None
    var.eval(), var2.eval()
    _, x = teacher_input(vae)
    labels = torch.tensor([0, 1])
    assert torch.equal(var(labels, x), var2(labels, x))
    assert torch.equal(var.autoregressive_infer_cfg(2, labels, g_seed=3),
                       var2.autoregressive_infer_cfg(2, labels, g_seed=3))


# ---------------------------------------------------------------- sampler
@pytest.mark.parametrize("was_training", [True, False])
def test_sampler_restores_mode_and_disables_drop_path(was_training):
    vae, var = tiny(drop_path_rate=0.5)
    with torch.no_grad():
        var.head.weight.mul_(50)  # peaked logits, so that a perturbed forward changes the drawn tokens
    var.eval()
    ref = var.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=7)
    var.train()  # sanity: drop-path is active in training mode
    _, x = teacher_input(vae)
    assert not torch.equal(var(torch.tensor([1, 2]), x), var(torch.tensor([1, 2]), x))
    var.train(was_training)
    vae_mode = vae.training
    img = var.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=7)
    assert var.training == was_training and all(m.training == was_training for m in var.modules())
    assert vae.training == vae_mode
    assert torch.equal(img, ref)
    assert all(b.attn.kv_cache is None and not b.attn.caching for b in var.blocks)


def test_sampler_outputs_and_seeds():
    vae, var = tiny()
    img, idx_Bl = var.autoregressive_infer_cfg(3, 2, g_seed=1, cfg=2.0, top_k=5, top_p=0.9, return_idx_Bl=True)
    assert img.shape == (3, 3, PNS[-1] * vae.downsample, PNS[-1] * vae.downsample)
    assert img.min() >= 0 and img.max() <= 1
    assert [tuple(t.shape) for t in idx_Bl] == [(3, pn * pn) for pn in PNS]
    _, again = var.autoregressive_infer_cfg(3, 2, g_seed=1, cfg=2.0, top_k=5, top_p=0.9, return_idx_Bl=True)
    assert all(torch.equal(a, b) for a, b in zip(idx_Bl, again))
    _, other = var.autoregressive_infer_cfg(3, 2, g_seed=2, cfg=2.0, top_k=5, top_p=0.9, return_idx_Bl=True)
    assert not all(torch.equal(a, b) for a, b in zip(idx_Bl, other))
    # random labels, the null class, more_smooth, and the global RNG all run
    assert var.autoregressive_infer_cfg(2, None, g_seed=0).shape[0] == 2
    assert var.autoregressive_infer_cfg(2, -1, g_seed=0, more_smooth=True).shape[0] == 2
    torch.manual_seed(0)
    a = var.autoregressive_infer_cfg(2, 1)
    torch.manual_seed(0)
    assert torch.equal(a, var.autoregressive_infer_cfg(2, 1))


def test_top_k_limits_drawn_tokens():
    _, var = tiny()
    _, idx_Bl = var.autoregressive_infer_cfg(2, 1, g_seed=4, top_k=1, return_idx_Bl=True)
    _, again = var.autoregressive_infer_cfg(2, 1, g_seed=9, top_k=1, return_idx_Bl=True)
    assert all(torch.equal(a, b) for a, b in zip(idx_Bl, again))  # top-1 is greedy: seed-independent


def test_sampler_rejects_bad_arguments():
    _, var = tiny()
    with pytest.raises(ValueError, match="B"):
        var.autoregressive_infer_cfg(0, 1)
    with pytest.raises(TypeError, match="B"):
        var.autoregressive_infer_cfg(2.0, 1)
    with pytest.raises(ValueError, match="label_B"):
        var.autoregressive_infer_cfg(2, torch.tensor([1, 99]))
    with pytest.raises(ValueError, match="label_B"):
        var.autoregressive_infer_cfg(2, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="label_B"):
        var.autoregressive_infer_cfg(2, 6)
    with pytest.raises(TypeError, match="label_B"):
        var.autoregressive_infer_cfg(2, "cat")
    with pytest.raises(ValueError, match="top_k"):
        var.autoregressive_infer_cfg(2, 1, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        var.autoregressive_infer_cfg(2, 1, top_p=1.5)
    with pytest.raises(TypeError, match="g_seed"):
        var.autoregressive_infer_cfg(2, 1, g_seed="1")
    with pytest.raises(TypeError, match="cfg"):
        var.autoregressive_infer_cfg(2, 1, cfg=None)
    assert not var.blocks[0].attn.caching


def test_constructor_rejects_bad_arguments():
    vae = VQVAE(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=PNS)
    with pytest.raises(TypeError, match="vae_local"):
        VAR(None, patch_nums=PNS)
    with pytest.raises(ValueError, match="embed_dim"):
        VAR(vae, embed_dim=65, num_heads=2, depth=1, patch_nums=PNS)
    with pytest.raises(ValueError, match="patch_nums"):
        VAR(vae, embed_dim=64, num_heads=2, depth=1, patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="depth"):
        VAR(vae, embed_dim=64, num_heads=2, depth=0, patch_nums=PNS)
    with pytest.raises(ValueError, match="drop_path_rate"):
        VAR(vae, embed_dim=64, num_heads=2, depth=1, drop_path_rate=1.0, patch_nums=PNS)
    with pytest.raises(TypeError, match="depth"):
        build_vae_var("meta", depth=2.5)
    _, var = tiny()
    _, x = teacher_input(vae)
    with pytest.raises(ValueError, match="x_BLCv_wo_first_l"):
        var(torch.tensor([0, 1]), x[:, 1:])
    with pytest.raises(ValueError, match="label_B"):
        var(torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match="label_B values"):
        var(torch.tensor([0, var.num_classes + 1]), x)


# ---------------------------------------------------------------- filters
def test_top_k_keeps_ties_and_top_p_keeps_the_max():
    logits = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 0.0]]])
    out = top_k_top_p_filter_(logits.clone(), top_k=2)
    assert torch.isfinite(out).tolist() == [[[False, True, True, False, False]]]
    out = top_k_top_p_filter_(torch.tensor([[[5.0, 0.0, 0.0]]]), top_p=0.01)
    assert torch.isfinite(out).tolist() == [[[True, False, False]]]
    x = torch.randn(2, 3, 50)
    assert torch.equal(top_k_top_p_filter_(x.clone(), top_k=50), x)  # k >= V keeps everything


def test_top_p_keeps_the_smallest_high_mass_set():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 30)
    out = top_k_top_p_filter_(logits.clone(), top_p=0.8)
    probs = logits.softmax(-1)
    kept_mass = (probs * torch.isfinite(out)).sum(-1)
    assert torch.all(kept_mass >= 0.8 - 1e-6)
    # every kept logit is at least as large as every removed one
    kept_min = out.masked_fill(~torch.isfinite(out), torch.inf).amin(-1)
    removed_max = logits.masked_fill(torch.isfinite(out), -torch.inf).amax(-1)
    assert torch.all(kept_min >= removed_max)


def test_sampling_draws_from_the_filtered_distribution():
    logits = torch.tensor([[[0.0, 10.0, 9.0, -5.0]]]).repeat(1, 2000, 1)
    g = torch.Generator().manual_seed(0)
    idx = sample_with_top_k_top_p_(logits.clone(), top_k=2, rng=g)
    assert idx.shape == (1, 2000, 1) and set(idx.unique().tolist()) == {1, 2}
    with pytest.raises(ValueError, match="num_samples"):
        sample_with_top_k_top_p_(logits.clone(), num_samples=0)


def test_gumbel_softmax_with_rng():
    logits = torch.randn(3, 7)
    a = gumbel_softmax_with_rng(logits, tau=0.5, rng=torch.Generator().manual_seed(1))
    b = gumbel_softmax_with_rng(logits, tau=0.5, rng=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.allclose(a.sum(-1), torch.ones(3))
    hard = gumbel_softmax_with_rng(logits, tau=0.5, hard=True, rng=torch.Generator().manual_seed(1))
    assert torch.equal(hard.argmax(-1), a.argmax(-1)) and torch.equal(hard.sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax_with_rng(logits, tau=0.0)


def test_attention_function_visible_end_form():
    # The integer form runs the block-causal kernel (when built); it must agree with the official float mask,
    # also with dropout, where it falls back to SDPA with the equivalent float mask.
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    visible_end = torch.tensor([1, 3, 3, 7, 7, 7, 7], dtype=torch.int32)
    bias = torch.where(torch.arange(7) < visible_end[:, None].long(), 0.0, -torch.inf)
    torch.testing.assert_close(attention(q, k, v, visible_end, 0.5), attention(q, k, v, bias, 0.5), atol=1e-5, rtol=0)
    torch.manual_seed(1)
    dropped_int = attention(q, k, v, visible_end, 0.5, dropout_p=0.5)
    torch.manual_seed(1)
    dropped_float = attention(q, k, v, bias, 0.5, dropout_p=0.5)
    torch.testing.assert_close(dropped_int, dropped_float)


def test_forward_and_grads_same_with_kernel_and_reference(monkeypatch):
    vae, var = tiny()
    _, x = teacher_input(vae, B=3)
    labels = torch.tensor([1, 3, 0])

    def run():
        var.zero_grad()
        logits = var(labels, x)
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in var.parameters() if p.grad is not None]

    kernel_logits, kernel_grads = run()
    monkeypatch.setenv("VARCORE_BACKEND", "reference")
    ref_logits, ref_grads = run()
    torch.testing.assert_close(kernel_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(kernel_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
