"""The few-row decode linear op (varcore.ops.linear): packing and products against the reference and F.linear on
every CPU instruction-set variant, row counts 1-70 (the micro tile's row tails and both prefetch schedules), widths
that are not a multiple of the 64-column panel, the fused RMSNorm variant, and bad arguments."""
import pytest
import torch
import torch.nn.functional as F

from backends import require_compiled
from varcore.ops import extension
from varcore.ops.linear import (PANEL, decode_linear, decode_linear_pack, decode_linear_pack_ref, decode_linear_ref,
                                decode_linear_rmsnorm, decode_linear_rmsnorm_ref)

SHAPES = [(64, 16), (2304, 768), (100, 37), (1, 5), (130, 129)]  # (out N, in K)


def _weights(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g)


def test_reference_matches_f_linear():
    for N, K in SHAPES:
        w = _weights(N, K, N)
        packed = decode_linear_pack_ref(w)
        assert packed.shape == (-(-N // PANEL), K, PANEL)
        for rows in (1, 3, 32):
            x = torch.randn(rows, K)
            torch.testing.assert_close(decode_linear_ref(x, packed, N), F.linear(x, w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_kernel_matches_the_reference_on_every_isa(isa, monkeypatch):
    require_compiled()
    if not extension.use_kernel("decode_linear", torch.device("cpu")):
        pytest.skip("varcore._C predates decode_linear")
    monkeypatch.setenv("VARCORE_CPU_ISA", isa)
    for N, K in SHAPES:
        w = _weights(N, K, N + K)
        packed = torch.ops.varcore.decode_linear_pack(w)
        assert torch.equal(packed, decode_linear_pack_ref(w))
        for rows in (1, 2, 5, 6, 7, 8, 13, 32, 70):
            x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
            y = torch.ops.varcore.decode_linear(x, packed, N)
            assert y.shape == (rows, N) and y.is_contiguous()
            torch.testing.assert_close(y, F.linear(x, w), atol=2e-5 * K ** 0.5, rtol=1e-5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # panels split across threads give the same result
    try:
        w, x = _weights(2304, 768, 1), torch.randn(8, 768)
        torch.testing.assert_close(decode_linear(x, decode_linear_pack(w), 2304), F.linear(x, w), atol=1e-3,
                                   rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_non_contiguous_input_and_empty_rows():
    w = _weights(96, 40, 3)
    packed = decode_linear_pack(w)
    x = torch.randn(40, 6).t()  # (6, 40), not contiguous
    torch.testing.assert_close(decode_linear(x, packed, 96), F.linear(x, w), atol=1e-4, rtol=1e-5)
    assert decode_linear(torch.zeros(0, 40), packed, 96).shape == (0, 96)


def test_bad_arguments():
    w = _weights(96, 40, 3)
    packed = decode_linear_pack(w)
    with pytest.raises(TypeError, match="weight must be float32"):
        decode_linear_pack(w.double())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        decode_linear_pack(w[0])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        decode_linear([[1.0]], packed, 96)
    with pytest.raises(ValueError, match="x has 41 input features, the packed weight 40"):
        decode_linear(torch.zeros(2, 41), packed, 96)
    with pytest.raises(ValueError, match="out_features=64"):
        decode_linear(torch.zeros(2, 40), packed, 64)
    with pytest.raises(ValueError, match="out_features=129"):
        decode_linear(torch.zeros(2, 40), packed, 129)
    with pytest.raises(ValueError, match="last dim 64"):
        decode_linear(torch.zeros(2, 40), packed[..., :32], 96)


@pytest.mark.parametrize("isa", ["avx512", "generic"])
def test_rmsnorm_variant_matches_rms_norm_then_linear(isa, monkeypatch):
    """decode_linear_rmsnorm == F.linear(F.rms_norm(x)) for several shapes, rows, scales of x and eps; the reference
    path agrees too. A missing norm weight, mean or eps would be off by far more than the tolerance."""
    monkeypatch.setenv("VARCORE_CPU_ISA", isa)
    for N, K in [(2304, 768), (100, 37), (130, 129)]:
        w = _weights(N, K, N)
        packed = decode_linear_pack(w)
        g = torch.rand(K, generator=torch.Generator().manual_seed(K)) + 0.5
        for rows, scale, eps in [(1, 1.0, 1e-5), (5, 30.0, 1e-6), (32, 1e-3, 1e-5), (33, 1.0, 0.1)]:
            x = scale * torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
            expected = F.linear(F.rms_norm(x, (K,), g, eps), w)
            tol = dict(atol=2e-5 * K ** 0.5, rtol=1e-5)
            torch.testing.assert_close(decode_linear_rmsnorm(x, packed, N, g, eps), expected, **tol)
            torch.testing.assert_close(decode_linear_rmsnorm_ref(x, packed, N, g, eps), expected, **tol)
    x = torch.randn(40, 6).t()  # (6, 40), not contiguous
    w, g = _weights(96, 40, 1), torch.rand(40)
    torch.testing.assert_close(decode_linear_rmsnorm(x, decode_linear_pack(w), 96, g, 1e-5),
                               F.linear(F.rms_norm(x, (40,), g, 1e-5), w), atol=1e-4, rtol=1e-5)


def test_rmsnorm_variant_bad_arguments():
    w = _weights(96, 40, 3)
    packed, g, x = decode_linear_pack(w), torch.ones(40), torch.zeros(2, 40)
    with pytest.raises(ValueError, match="norm_weight must have x's 40 features"):
        decode_linear_rmsnorm(x, packed, 96, torch.ones(39), 1e-5)
    with pytest.raises(TypeError, match="norm_weight must be float32"):
        decode_linear_rmsnorm(x, packed, 96, g.double(), 1e-5)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        decode_linear_rmsnorm(x, packed, 96, g, float("nan"))
    with pytest.raises(ValueError, match="x has 41 input features"):
        decode_linear_rmsnorm(torch.zeros(2, 41), packed, 96, g, 1e-5)
    if extension.use_kernel("decode_linear_rmsnorm", torch.device("cpu")):  # the C++ checks, called directly
        with pytest.raises(RuntimeError, match="norm_weight must be float32 of shape"):
            torch.ops.varcore.decode_linear_rmsnorm(x, packed, 96, torch.ones(41), 1e-5)
        with pytest.raises(RuntimeError, match="eps must be finite"):
            torch.ops.varcore.decode_linear_rmsnorm(x, packed, 96, g, -1.0)
