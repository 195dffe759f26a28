"""LlamaGen VQ-16 tokenizer: official key names and shapes (meta device), L2-normalised codebook, encode/decode
round trips on a small random instance, checkpoint loading, bad arguments."""
import pytest
import torch

from varcore.checkpoints import load_vq16
from varcore.models.vq16 import VQ_16, ModelArgs, VQModel


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    vq = VQModel(ModelArgs(codebook_size=64, codebook_embed_dim=8, z_channels=32, ch=32,
                           encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], num_res_blocks=1))
    with torch.no_grad():  # a spread-out codebook so that nearest codes are well separated
        vq.quantize.embedding.weight.normal_()
    return vq.eval()


def test_vq16_keys_and_shapes_match_the_spec():
    with torch.device("meta"):
        vq = VQ_16()
    state = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    assert state["quantize.embedding.weight"] == (16384, 8)
    assert state["quantize.codebook_used"] == (65536,)
    assert state["quant_conv.weight"] == (8, 256, 1, 1) and state["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert state["encoder.conv_in.weight"] == (128, 3, 3, 3) and state["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert state["decoder.conv_in.weight"] == (512, 256, 3, 3) and state["decoder.conv_out.weight"] == (3, 128, 3, 3)
    groups = {}  # (side, level, kind) -> sub-module names, e.g. ("encoder", 4, "attn") -> {"0", "1"}
    for k in state:
        side, part, *rest = k.split(".")
        if part == "conv_blocks":
            groups.setdefault((side, int(rest[0]), rest[1]), set()).add(rest[2])
    # spec B.9: encoder 5 levels x 2 res, attention only at level 4 (2 blocks), downsample at levels 0-3;
    # decoder 5 levels x 3 res, attention only at level 0 (3 blocks), upsample at levels 0-3
    for side, n_res, attn_level, resample in (("encoder", 2, 4, "downsample"), ("decoder", 3, 0, "upsample")):
        for level in range(5):
            assert groups[(side, level, "res")] == {str(i) for i in range(n_res)}
            assert ((side, level, "attn") in groups) == (level == attn_level)
            assert ((side, level, resample) in groups) == (level != 4)
        assert groups[(side, attn_level, "attn")] == {str(i) for i in range(n_res)}
    for name in ("norm", "q", "k", "v", "proj_out"):
        assert f"encoder.mid.1.{name}.weight" in state and f"decoder.mid.1.{name}.weight" in state
    assert "encoder.conv_blocks.2.res.0.nin_shortcut.weight" in state  # 128 -> 256 channels
    assert "encoder.conv_blocks.1.res.0.nin_shortcut.weight" not in state


def test_codebook_entries_are_unit_vectors(small):
    codes = small.quantize.get_codebook_entry(torch.arange(64))
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(64))


def test_codes_round_trip_through_the_quantiser(small):
    idx = torch.randint(0, 64, (2, 16))
    z = small.quantize.get_codebook_entry(idx, (2, 8, 4, 4))
    assert z.shape == (2, 8, 4, 4)
    _, _, (_, _, again) = small.quantize(z * 3.0)  # scale does not matter after L2 normalisation
    assert torch.equal(again.view(2, 16), idx)


def test_encode_decode_round_trip(small):
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = small.img_to_idx(img)
    assert idx.shape == (2, 8, 8) and idx.dtype == torch.int64
    with torch.no_grad():
        quant, _, _ = small.encode(img)
        decoded = small.decode_code(idx.view(2, -1), (2, 8, 8, 8))
        torch.testing.assert_close(decoded, small.decode(quant), atol=1e-5, rtol=1e-5)
        recon, _ = small(img)
        assert recon.shape == img.shape
        assert torch.equal(small.img_to_idx(img), idx)


@pytest.mark.parametrize("wrapper", [None, "model"])
def test_load_vq16(small, wrapper):
    state = small.state_dict()
    kw = dict(z_channels=32, ch=32, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], num_res_blocks=1)
    loaded = load_vq16(state if wrapper is None else {wrapper: state}, **kw)
    assert not loaded.training and all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="shape mismatches"):
        load_vq16(state, **{**kw, "ch": 64})


def test_bad_arguments(small):
    with pytest.raises(ValueError, match="ch_mult"):
        ModelArgs(ch=48)
    with pytest.raises(ValueError, match="codebook_size"):
        ModelArgs(codebook_size=0)
    with pytest.raises(ValueError, match="img"):
        small.img_to_idx(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of 2"):
        small.img_to_idx(torch.zeros(1, 3, 15, 16))
    with pytest.raises(TypeError, match="config"):
        VQModel({"ch": 32})


# ---------------------------------------------------------------------------------------------- bit-exact attention
def _official_order_attention(block, x):
    """The official LlamaGen AttnBlock op sequence (tokenizer/tokenizer_image/vq_model.py), written from its
    description: GroupNorm; 1x1 convs q, k, v; q reshaped (b, c, hw) and permuted to (b, hw, c); k (b, c, hw);
    w = bmm(q, k) * int(c) ** -0.5; softmax over dim 2; v (b, c, hw); h = bmm(v, w.permute(0, 2, 1));
    reshape (b, c, h, w); proj_out; x + h."""
    h_ = block.norm(x)
    q, k, v = block.q(h_), block.k(h_), block.v(h_)
    b, c, h, w = q.shape
    w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
    w_ = torch.nn.functional.softmax(w_, dim=2)
    h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + block.proj_out(h_)


@pytest.mark.parametrize("B, C, H, W, seed", [(1, 32, 4, 4, 0), (2, 64, 6, 6, 1), (3, 32, 8, 5, 2), (2, 96, 3, 7, 3)])
def test_attention_block_is_bit_exact_with_the_official_op_order(B, C, H, W, seed):
    from varcore.models.vq16 import AttnBlock

    torch.manual_seed(seed)
    block = AttnBlock(C).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(B, C, H, W) * 2
        out = block(x)
        ref = _official_order_attention(block, x)
        fused = x + block.proj_out(torch.nn.functional.scaled_dot_product_attention(
            *(conv(block.norm(x)).reshape(B, 1, C, H * W).transpose(-1, -2) for conv in (block.q, block.k, block.v))
        ).transpose(-1, -2).reshape(B, C, H, W))
    assert torch.equal(out, ref)
    torch.testing.assert_close(out, fused, atol=1e-4, rtol=1e-4)  # a fused kernel agrees only up to rounding


def test_decode_uses_the_official_attention_order(small):
    """Every attention block of the decoder follows the official order: replacing them by the reference leaves the
    float32 decode bit-identical."""
    from varcore.models.vq16 import AttnBlock

    codes = torch.randint(0, 64, (2, 36), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = small.decode_code(codes, [2, 8, 6, 6])
        blocks = [m for m in small.modules() if isinstance(m, AttnBlock)]
        assert blocks
        original = AttnBlock.forward
        try:
            AttnBlock.forward = _official_order_attention
            ref = small.decode_code(codes, [2, 8, 6, 6])
        finally:
            AttnBlock.forward = original
    assert torch.equal(ours, ref)
