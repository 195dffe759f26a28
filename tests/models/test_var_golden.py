"""Parity with the official FoundationVision/VAR code on its golden outputs (float32, CPU)."""
import json

import pytest
import torch
from conftest import load_expected, load_var_small

from varcore.models import PATCH_NUMS, VQVAE
from varcore.models.quant import phi_index_table
from varcore.ops.quant import upsample_sum_ref

ATOL = 1e-5
IMG_ATOL = 1e-4
# Every key of var-small/expected.pt is checked by one of the tests below.
CHECKED_KEYS = {"img", "labels", "idx_Bl", "fhat_per_scale", "img_reconstructed", "var_input_BLCv", "logits_BLV"}


@pytest.fixture(scope="module")
def var_small(golden_dir):
    vae, var, cfg = load_var_small(golden_dir)
    return vae, var, cfg, load_expected(golden_dir / "var-small")


def _assert_list_close(actual, expected, atol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, atol=atol, rtol=0)


def test_every_expected_key_is_checked(var_small):
    _, _, cfg, expected = var_small
    sample_keys = {f"sample{i}_{k}" for i in range(len(cfg["samples"])) for k in ("img", "idx_Bl")}
    assert set(expected) == CHECKED_KEYS | sample_keys


def test_img_to_idxBl_exact(var_small):
    vae, _, _, expected = var_small
    assert expected["labels"].shape == (expected["img"].shape[0],)
    idx_Bl = vae.img_to_idxBl(expected["img"])
    assert len(idx_Bl) == len(expected["idx_Bl"])
    for a, e in zip(idx_Bl, expected["idx_Bl"]):
        assert a.dtype == torch.long
        assert torch.equal(a, e)


def test_fhat_per_scale(var_small):
    vae, _, _, expected = var_small
    f = vae.quant_conv(vae.encoder(expected["img"]))
    _assert_list_close(vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True), expected["fhat_per_scale"], ATOL)


def test_reconstruction(var_small):
    vae, _, _, expected = var_small
    img = vae.idxBl_to_img(expected["idx_Bl"], same_shape=True, last_one=True)
    # the decoder's float32 convolutions round by instruction set: the official code itself lands 1.3e-5 from the
    # recorded image on an AVX2-only CPU
    torch.testing.assert_close(img, expected["img_reconstructed"], atol=4 * ATOL, rtol=0)


def test_teacher_forcing_input(var_small):
    vae, _, _, expected = var_small
    x = vae.quantize.idxBl_to_var_input(expected["idx_Bl"])
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, expected["var_input_BLCv"], atol=ATOL, rtol=0)


def test_logits(var_small):
    _, var, _, expected = var_small
    logits = var(expected["labels"], expected["var_input_BLCv"])
    torch.testing.assert_close(logits, expected["logits_BLV"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("i", [0, 1])
def test_samples(var_small, i):
    _, var, cfg, expected = var_small
    kwargs = cfg["samples"][i]
    img, idx_Bl = var.autoregressive_infer_cfg(B=cfg["config"]["B"], label_B=expected["labels"],
                                               return_idx_Bl=True, **kwargs)
    for a, e in zip(idx_Bl, expected[f"sample{i}_idx_Bl"]):
        assert torch.equal(a, e)
    assert len(idx_Bl) == len(expected[f"sample{i}_idx_Bl"])
    torch.testing.assert_close(img, expected[f"sample{i}_img"], atol=IMG_ATOL, rtol=0)
    # the default return is the official one: images only, and the same images again for the same seed
    img_again = var.autoregressive_infer_cfg(B=cfg["config"]["B"], label_B=expected["labels"], **kwargs)
    assert torch.equal(img_again, img)


# ---------------------------------------------------------------- code-small: the 10-scale VAE
@pytest.fixture(scope="module")
def code_small(golden_dir):
    folder = golden_dir / "code-small"
    cfg = json.loads((folder / "config.json").read_text())
    vae = VQVAE(vocab_size=cfg["V"], z_channels=cfg["Cvae"], ch=cfg["ch"], share_quant_resi=4,
                v_patch_nums=tuple(cfg["patch_nums"]))
    vae.load_state_dict(torch.load(folder / "vae.pth", weights_only=True), strict=True)
    expected = load_expected(folder)
    idx_Bl = list(expected["run0_draft_idx_Bl"]) + list(expected["run0_refine_idx_Bl"])
    return vae, cfg, expected, idx_Bl


def _embed(vae, idx_Bl):
    B = idx_Bl[0].shape[0]
    return [vae.quantize.embedding(t).transpose(1, 2).reshape(B, vae.Cvae, pn, pn)
            for t, pn in zip(idx_Bl, vae.quantize.v_patch_nums)]


def test_code_small_phi_table(code_small):
    vae, cfg, _, _ = code_small
    assert tuple(cfg["patch_nums"]) == PATCH_NUMS[256]
    qresi_ls = list(vae.quantize.quant_resi.qresi_ls)
    used = [qresi_ls.index(phi) for phi in vae.quantize.phis_for(len(cfg["patch_nums"]))]
    assert used == phi_index_table(4, 10)
    assert used == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # spec/var.md 1.3, with the float ties at si=2 and si=7


def test_code_small_fhat_and_token_hub(code_small):
    vae, cfg, expected, idx_Bl = code_small
    f_hats = vae.quantize.embed_to_fhat(_embed(vae, idx_Bl), all_to_max_scale=True, last_one=False)
    N = cfg["runs"][0]["N"]
    torch.testing.assert_close(f_hats[N - 1], expected["run0_draft_fhat"], atol=ATOL, rtol=0)
    torch.testing.assert_close(f_hats[-1], expected["run0_final_fhat"], atol=ATOL, rtol=0)
    hub = expected["run0_token_hub"]
    x = vae.quantize.idxBl_to_var_input(idx_Bl)
    torch.testing.assert_close(x[:, :hub.shape[1]], hub, atol=ATOL, rtol=0)
    img = vae.fhat_to_img(f_hats[-1]).add_(1).mul_(0.5)
    torch.testing.assert_close(img, expected["run0_img"], atol=IMG_ATOL, rtol=0)


def test_code_small_tie_break_is_pinned_by_golden(code_small):
    """The golden f_hat tells the tie-break apart: resolving the si=2 tie the other way changes it."""
    vae, _, expected, idx_Bl = code_small
    phis = list(vae.quantize.phis_for(10))  # a plain list of callables: the reference path
    phis[2] = vae.quantize.quant_resi.qresi_ls[0]
    f_hat = upsample_sum_ref(idx_Bl, vae.quantize.embedding.weight, phis, vae.quantize.v_patch_nums)
    assert (f_hat - expected["run0_final_fhat"]).abs().max() > 1e-3


def test_code_small_round_trip_shapes(code_small):
    vae, cfg, _, _ = code_small
    pns = tuple(cfg["patch_nums"])
    img = torch.rand(1, 3, pns[-1] * vae.downsample, pns[-1] * vae.downsample) * 2 - 1
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(img)
        assert [tuple(t.shape) for t in idx_Bl] == [(1, pn * pn) for pn in pns]
        assert all(int(t.max()) < cfg["V"] and int(t.min()) >= 0 for t in idx_Bl)
        rec = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True)
        assert rec.shape == img.shape and rec.min() >= -1 and rec.max() <= 1
        # decoding the tokens equals quantising the encoder output directly (the two paths sum f_hat in
        # different memory layouts, ~1e-7 apart, which the random-weight decoder amplifies to ~1e-5)
        torch.testing.assert_close(rec, vae.img_to_reconstructed_img(img, last_one=True), atol=IMG_ATOL, rtol=0)
