"""VQVAE, the quantiser's phi table and the reference quantiser ops."""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from varcore.models import VQVAE
from varcore.models.quant import VectorQuantizer2, phi_index_table, phi_ticks
from varcore.ops import quant as ops

PNS = (1, 2, 3, 5)  # odd sizes on purpose


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = VQVAE(vocab_size=48, z_channels=4, ch=32, v_patch_nums=PNS)
    with torch.no_grad():  # spread the codebook so that quantisation is not degenerate
        model.quantize.embedding.weight.normal_()
    return model


@pytest.fixture(scope="module")
def f_BChw(vae):
    torch.manual_seed(1)
    return torch.randn(2, vae.Cvae, PNS[-1], PNS[-1])


# ---------------------------------------------------------------- phi table
def test_phi_table_spec_values():
    # spec/var.md 1.3: the official float64 arithmetic (ties at 2/9 and 7/9 go to the higher index)
    assert phi_index_table(4, 10) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_table(4, 14) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


def _exact_nearest(K: int, si: int, SN: int) -> set:
    margin = Fraction(1, 3 * K) if K == 4 else Fraction(1, 2 * K)
    ticks = [margin + (1 - 2 * margin) * Fraction(k, K - 1) if K > 1 else margin for k in range(K)]
    at = Fraction(si, SN - 1)
    d = [abs(t - at) for t in ticks]
    return {k for k in range(K) if d[k] == min(d)}


@settings(max_examples=200, deadline=None)
@given(K=st.integers(1, 12), SN=st.integers(2, 40))
def test_phi_table_is_a_nearest_tick(K, SN):
    table = phi_index_table(K, SN)
    assert len(table) == SN
    for si, k in enumerate(table):
        assert k in _exact_nearest(K, si, SN)
    assert table == sorted(table)


def test_phi_ticks_match_official_layout():
    torch.testing.assert_close(torch.from_numpy(phi_ticks(4)),
                               torch.tensor([1 / 12, 1 / 12 + 5 / 18, 1 / 12 + 10 / 18, 11 / 12],
                                            dtype=torch.float64))
    with pytest.raises(ValueError, match="K"):
        phi_ticks(0)
    with pytest.raises(ValueError, match="SN"):
        phi_index_table(4, 1)


@pytest.mark.parametrize("share, SN", [(0, 4), (0, 10), (1, 10), (2, 7), (3, 10), (4, 10), (4, 14), (6, 9)])
def test_quantizer_uses_the_table(share, SN):
    q = VectorQuantizer2(vocab_size=8, Cvae=4, using_znorm=False, v_patch_nums=tuple(range(1, SN + 1)),
                         share_quant_resi=share)
    phis = q.phis_for(SN)
    if share == 1:
        assert all(phi is q.quant_resi.qresi for phi in phis)
        return
    pool = list(q.quant_resi) if share == 0 else list(q.quant_resi.qresi_ls)
    assert [pool.index(phi) for phi in phis] == phi_index_table(len(pool), SN)


def test_state_dict_keys_by_sharing():
    keys = {s: set(VectorQuantizer2(8, 4, False, v_patch_nums=(1, 2, 3), share_quant_resi=s).state_dict())
            for s in (0, 1, 4)}
    assert "quant_resi.qresi_ls.3.weight" in keys[4] and "quant_resi.qresi_ls.4.weight" not in keys[4]
    assert "quant_resi.qresi.weight" in keys[1]
    assert {"quant_resi.0.weight", "quant_resi.2.bias"} <= keys[0]
    assert all({"embedding.weight", "ema_vocab_hit_SV"} <= k for k in keys.values())


def test_identity_phi_when_ratio_is_zero():
    q = VectorQuantizer2(8, 4, False, v_patch_nums=(1, 2), quant_resi=0.0)
    h = torch.randn(1, 4, 2, 2)
    assert all(torch.equal(phi(h), h) for phi in q.phis_for(2))
    assert not any("quant_resi" in k for k in q.state_dict())


# ---------------------------------------------------------------- reference ops
def test_nearest_code_matches_cdist():
    torch.manual_seed(2)
    z, e = torch.randn(300, 6), torch.randn(40, 6)
    assert torch.equal(ops.nearest_code(z, e), torch.cdist(z, e).argmin(dim=1))
    cos = F.normalize(z, dim=1) @ F.normalize(e, dim=1).T
    assert torch.equal(ops.nearest_code(z, e, using_znorm=True), cos.argmax(dim=1))


def _official_var_input(q, idx_Bl):
    """The official idxBl_to_var_input loop, written out (spec/var.md 1.6)."""
    B, C, H, SN = idx_Bl[0].shape[0], q.Cvae, PNS[-1], len(PNS)
    f_hat, out = torch.zeros(B, C, H, H), []
    for si in range(SN - 1):
        h = q.embedding(idx_Bl[si]).transpose(1, 2).reshape(B, C, PNS[si], PNS[si])
        f_hat.add_(q.quant_resi[si / (SN - 1)](F.interpolate(h, size=(H, H), mode="bicubic")))
        out.append(F.interpolate(f_hat, size=(PNS[si + 1],) * 2, mode="area").view(B, C, -1).transpose(1, 2))
    return torch.cat(out, dim=1)


def _official_fhats(q, hs):
    """The official embed_to_fhat loop (all_to_max_scale): every partial sum."""
    SN, H = len(PNS), PNS[-1]
    f_hat, out = torch.zeros(hs[0].shape[0], q.Cvae, H, H), []
    for si, h in enumerate(hs):
        f_hat.add_(q.quant_resi[si / (SN - 1)](F.interpolate(h, size=(H, H), mode="bicubic") if si < SN - 1 else h))
        out.append(f_hat.clone())
    return out


@pytest.mark.parametrize("backend", ["", "reference"])
def test_module_methods_are_the_official_loops(vae, f_BChw, monkeypatch, backend):
    """The official methods composed from the ops equal the official loops: the teacher-forcing input and the
    partial sums bit for bit, the fused final sum (upsample_sum reorders the sum) to float rounding."""
    monkeypatch.setenv("VARCORE_BACKEND", backend)
    q = vae.quantize
    with torch.no_grad():
        idx_Bl = q.f_to_idxBl_or_fhat(f_BChw, to_fhat=False)
        ref_idx = ops.msrq_encode_ref(f_BChw, q.embedding.weight, list(q.phis_for(len(PNS))), PNS, to_fhat=False)
        assert all(torch.equal(a, b) for a, b in zip(idx_Bl, ref_idx))
        assert torch.equal(q.idxBl_to_var_input(idx_Bl), _official_var_input(q, idx_Bl))
        hs = [q.embedding(t).transpose(1, 2).reshape(2, vae.Cvae, pn, pn) for t, pn in zip(idx_Bl, PNS)]
        expected = _official_fhats(q, hs)
        assert all(torch.equal(a, b) for a, b in zip(q.embed_to_fhat(hs), expected))
        torch.testing.assert_close(q.embed_to_fhat(hs, last_one=True), expected[-1], atol=1e-6, rtol=0)
        torch.testing.assert_close(q.idxBl_to_fhat(idx_Bl), expected[-1], atol=1e-6, rtol=0)


def test_encode_paths_agree(vae, f_BChw):
    """Encode to indices, encode to f_hat, decode indices, teacher input and AR steps describe one f_hat."""
    q = vae.quantize
    phis = q.phis_for(len(PNS))
    W = q.embedding.weight
    with torch.no_grad():
        idx_Bl = ops.msrq_encode(f_BChw, W, phis, PNS, to_fhat=False)
        f_hats = ops.msrq_encode(f_BChw, W, phis, PNS, to_fhat=True)
        hs = [F.embedding(t, W).transpose(1, 2).reshape(2, vae.Cvae, pn, pn) for t, pn in zip(idx_Bl, PNS)]
        decoded = q.embed_to_fhat(hs, last_one=False)
        assert [tuple(t.shape) for t in idx_Bl] == [(2, pn * pn) for pn in PNS]
        for a, b in zip(f_hats, decoded):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

        x_BLCv = q.idxBl_to_var_input(idx_Bl)
        assert x_BLCv.shape == (2, sum(pn * pn for pn in PNS[1:]), vae.Cvae)
        expected_inputs = [F.interpolate(decoded[si], size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
                           for si, pn in enumerate(PNS[1:])]
        torch.testing.assert_close(x_BLCv, torch.cat(expected_inputs, dim=1), atol=1e-6, rtol=0)

        f_hat = torch.zeros_like(f_BChw)
        for si, h in enumerate(hs):
            f_hat, nxt = ops.add_scale_(si, f_hat, h, phis, PNS)
            torch.testing.assert_close(f_hat, decoded[si], atol=1e-6, rtol=0)
            if si < len(PNS) - 1:
                torch.testing.assert_close(nxt.flatten(2).transpose(1, 2), expected_inputs[si], atol=1e-6, rtol=0)
            else:
                assert nxt is f_hat


def test_residual_shrinks_over_scales(vae, f_BChw):
    f_hats = vae.quantize.f_to_idxBl_or_fhat(f_BChw, to_fhat=True)
    err = [(f_BChw - fh).square().mean().item() for fh in f_hats]
    assert err[-1] < err[0]


def test_non_square_patch_override(vae):
    f = torch.randn(1, vae.Cvae, 3, 5)
    idx_Bl = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=[(1, 1), (2, 3), (3, 5)])
    assert [tuple(t.shape) for t in idx_Bl] == [(1, 1), (1, 6), (1, 15)]


def test_experimental_native_resolution_branch(vae, f_BChw):
    q = vae.quantize
    idx_Bl = q.f_to_idxBl_or_fhat(f_BChw, to_fhat=False)
    hs = [q.embedding(t).transpose(1, 2).reshape(2, vae.Cvae, pn, pn) for t, pn in zip(idx_Bl, PNS)]
    partial = q.embed_to_fhat(hs, all_to_max_scale=False)
    assert [tuple(f.shape[-2:]) for f in partial] == [(pn, pn) for pn in PNS]


def test_ops_reject_bad_arguments(vae, f_BChw):
    W = vae.quantize.embedding.weight
    phis = vae.quantize.phis_for(len(PNS))
    with pytest.raises(ValueError, match="patch_nums"):
        ops.msrq_encode(f_BChw, W, phis, (1, 2, 4), to_fhat=False)
    with pytest.raises(ValueError, match="phis"):
        ops.msrq_encode(f_BChw, W, phis[:2], PNS, to_fhat=False)
    with pytest.raises(TypeError, match="codebook_VC"):
        ops.msrq_encode(f_BChw, W.tolist(), phis, PNS, to_fhat=False)
    with pytest.raises(ValueError, match="channels"):
        ops.msrq_encode(f_BChw[:, :2], W, phis, PNS, to_fhat=False)
    with pytest.raises(ValueError, match="gt_ms_idx_Bl"):
        vae.quantize.idxBl_to_var_input([torch.zeros(2, 1, dtype=torch.long)] * 3)
    bad = [torch.zeros(2, pn * pn, dtype=torch.long) for pn in PNS]
    bad[1][0, 0] = -1
    with pytest.raises(ValueError, match=r"gt_ms_idx_Bl\[1\] values"):
        vae.quantize.idxBl_to_var_input(bad)
    with pytest.raises(ValueError, match="patch_nums"):
        ops.upsample_sum([], W, phis, (1, 0, 3, 5))
    with pytest.raises(TypeError, match="patch_nums"):
        ops.upsample_sum([], W, phis, "1235")
    with pytest.raises(ValueError, match="si"):
        ops.add_scale_(4, f_BChw.clone(), f_BChw, phis, PNS)
    with pytest.raises(ValueError, match="SN"):
        vae.quantize.get_next_autoregressive_input(0, 3, f_BChw.clone(), f_BChw[:, :, :1, :1])


# ---------------------------------------------------------------- VQVAE
def test_configurable_downsampling():
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2, 2), v_patch_nums=(1, 2, 4))
    assert vae.downsample == 4
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(img)
        assert [tuple(t.shape) for t in idx_Bl] == [(2, 1), (2, 4), (2, 16)]
        rec = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=False)
    assert len(rec) == 3 and all(r.shape == img.shape for r in rec)
    assert "encoder.down.2.block.0.conv1.weight" in vae.state_dict()
    assert "encoder.down.3.block.0.conv1.weight" not in vae.state_dict()


def test_default_is_the_official_architecture():
    with torch.device("meta"):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160)
    assert vae.downsample == 16 and vae.ch_mult == (1, 1, 2, 2, 4)
    sd = vae.state_dict()
    # up.0 is the highest resolution: no upsample, and the level above it narrows 320 -> 160 channels
    assert "decoder.up.0.upsample.conv.weight" not in sd and "decoder.up.1.upsample.conv.weight" in sd
    assert sd["decoder.up.1.block.0.conv1.weight"].shape == (160, 320, 3, 3)
    assert sd["decoder.up.4.attn.2.qkv.weight"].shape == (1920, 640, 1, 1)
    assert sd["encoder.down.4.attn.1.qkv.weight"].shape == (1920, 640, 1, 1)
    assert sd["quantize.ema_vocab_hit_SV"].shape == (10, 4096)
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 2) == 108.95  # spec/var.md 1.1
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_load_state_dict_tolerates_other_scale_count(vae, tmp_path):
    other = VQVAE(vocab_size=48, z_channels=4, ch=32, v_patch_nums=(1, 2, 3, 4, 5))
    sd = other.state_dict()
    own_ema = vae.quantize.ema_vocab_hit_SV.clone()
    vae_copy = VQVAE(vocab_size=48, z_channels=4, ch=32, v_patch_nums=PNS)
    vae_copy.load_state_dict(sd, strict=True)
    assert sd["quantize.ema_vocab_hit_SV"].shape == (5, 48)  # the caller's dict is untouched
    assert torch.equal(vae_copy.quantize.ema_vocab_hit_SV, own_ema)
    assert torch.equal(vae_copy.quantize.embedding.weight, other.quantize.embedding.weight)


def test_vae_training_forward():
    torch.manual_seed(3)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4), test_mode=False)
    vae.train()
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    rec, usages, loss = vae(img, ret_usages=True)
    assert rec.shape == img.shape and loss.ndim == 0 and torch.isfinite(loss)
    assert len(usages) == 3 and all(0 <= u <= 100 for u in usages)
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0
    loss.backward()
    assert vae.encoder.conv_in.weight.grad is not None and vae.quantize.embedding.weight.grad is not None
    # the straight-through output has the value of the quantised f_hat
    f = vae.quant_conv(vae.encoder(img))
    f_hat, _, _ = vae.quantize(f)
    torch.testing.assert_close(f_hat, vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1], atol=1e-5, rtol=0)


def test_vqvae_rejects_bad_arguments(vae):
    with pytest.raises(ValueError, match="vocab_size"):
        VQVAE(vocab_size=0)
    with pytest.raises(ValueError, match="ch"):
        VQVAE(ch=30)
    with pytest.raises(ValueError, match="v_patch_nums"):
        VQVAE(v_patch_nums=(16,))
    with pytest.raises(ValueError, match="share_quant_resi"):
        VQVAE(share_quant_resi=-1)
    with pytest.raises(ValueError, match="ch_mult"):
        VQVAE(ch_mult=())
    with pytest.raises(ValueError, match="inp_img_no_grad"):
        vae.img_to_idxBl(torch.zeros(1, 1, 80, 80))
    with pytest.raises(ValueError, match="multiples"):
        vae.img_to_idxBl(torch.zeros(1, 3, 81, 80))
    with pytest.raises(TypeError, match="x"):
        vae.img_to_reconstructed_img([[0.0]])
    with pytest.raises(ValueError, match="ms_idx_Bl"):
        vae.idxBl_to_img([torch.zeros(1, 3, dtype=torch.long)], same_shape=True)
    with pytest.raises(ValueError, match=r"ms_idx_Bl\[1\] values"):
        vae.idxBl_to_img([torch.zeros(1, 1, dtype=torch.long), torch.full((1, 4), 48)], same_shape=True)
