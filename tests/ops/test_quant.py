"""Fused quantiser kernels (csrc/quant) on every backend against the references in varcore.ops.quant: nearest
code (Euclidean and cosine, ties, odd sizes, VAR's scale shapes, every CPU ISA), bad input, opcheck, compile,
dispatch and memory."""
import re

import pytest
import torch
import torch.nn.functional as F

import varcore
from varcore.models.quant import VectorQuantizer2, phi_index_table
from varcore.ops import extension
from varcore.ops import quant as q

from backends import backend_params, require_compiled, resolve

NAMES = {"nearest": (q.nearest_code_ref, "nearest_code")}


def _codebook_data(N, V, C, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)


def assert_same_or_near_tie(idx, ref, z, e, using_znorm):
    """idx equals ref, except where the two codes' distances agree to float32 rounding (a near-tie that another
    summation order may decide either way). Computed in float64 from the inputs."""
    assert idx.dtype == torch.long and idx.shape == ref.shape
    assert int(idx.min()) >= 0 and int(idx.max()) < e.shape[0]
    differ = (idx != ref).nonzero().flatten()
    assert differ.numel() <= max(1, idx.numel() // 1000), f"{differ.numel()} of {idx.numel()} rows differ"
    z64, e64 = z.double(), e.double()
    if using_znorm:
        z64, e64 = F.normalize(z64, dim=1), F.normalize(e64, dim=1)
    for n in differ.tolist():
        d = (z64[n] - e64[[idx[n], ref[n]]]).square().sum(1)
        scale = z64[n].square().sum() + e64[[idx[n], ref[n]]].square().sum(1).max()
        assert abs(float(d[0] - d[1])) <= 1e-5 * float(scale), f"row {n}: {idx[n]} vs {ref[n]} is not a near-tie"


# --------------------------------------------------------------------------------------------- nearest code
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("N,V,C", [(1, 1, 1), (7, 5, 3), (100, 64, 8), (257, 300, 32), (50, 33, 13), (3, 40, 70)])
@pytest.mark.parametrize("using_znorm", [False, True])
def test_nearest_code_matches_reference(backend, N, V, C, using_znorm):
    ops = resolve(backend, NAMES)
    z, e = _codebook_data(N, V, C, seed=N * 31 + V * 7 + C)
    idx = ops.nearest(z.to(ops.device), e.to(ops.device), using_znorm).cpu()
    ref = q.nearest_code_ref(z, e, using_znorm)
    assert_same_or_near_tie(idx, ref, z, e, using_znorm)


@pytest.mark.parametrize("backend", backend_params())
def test_nearest_code_ties_take_the_first_code(backend):
    ops = resolve(backend, NAMES)
    z, e = _codebook_data(64, 20, 8, seed=5)
    # every code appears twice (at v and v + 20) and three times once more at the end: the first copy wins
    e_dup = torch.cat([e, e, e[:3]])
    for using_znorm in (False, True):
        idx = ops.nearest(z.to(ops.device), e_dup.to(ops.device), using_znorm).cpu()
        assert int(idx.max()) < 20
        assert torch.equal(idx, q.nearest_code_ref(z, e_dup, using_znorm))
    # a constant codebook: every distance ties, index 0 everywhere (as torch.argmin)
    same = torch.ones(37, 8)
    idx = ops.nearest(z.to(ops.device), same.to(ops.device), False).cpu()
    assert torch.equal(idx, torch.zeros(64, dtype=torch.long))
    # a row equal to a code (distance 0 up to rounding) finds it
    assert torch.equal(ops.nearest(e.to(ops.device), e.to(ops.device), False).cpu(), torch.arange(20))


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
def test_nearest_code_var_scales(backend):
    """The 256 px schedule's row counts at B=2 against VAR's full codebook (V=4096, Cvae=32)."""
    ops = resolve(backend, NAMES)
    g = torch.Generator().manual_seed(11)
    e = torch.randn(4096, 32, generator=g) * 0.5
    for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16):
        z = torch.randn(2 * pn * pn, 32, generator=g)
        idx = ops.nearest(z.to(ops.device), e.to(ops.device), False).cpu()
        assert_same_or_near_tie(idx, q.nearest_code_ref(z, e), z, e, False)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_nearest_code_every_cpu_isa(monkeypatch, isa):
    require_compiled()
    monkeypatch.setenv("VARCORE_CPU_ISA", isa)
    for N, V, C in [(1, 1, 1), (131, 517, 32), (29, 70, 5)]:
        z, e = _codebook_data(N, V, C, seed=N + V)
        for using_znorm in (False, True):
            idx = torch.ops.varcore.nearest_code(z, e, using_znorm)
            assert_same_or_near_tie(idx, q.nearest_code_ref(z, e, using_znorm), z, e, using_znorm)


@pytest.mark.parametrize("backend", backend_params())
def test_nearest_code_non_contiguous_inputs(backend):
    ops = resolve(backend, NAMES)
    z, e = _codebook_data(40, 48, 12, seed=9)
    z_t = z.t().contiguous().t()  # column-major rows
    e_s = torch.cat([e, e], dim=1)[:, 3:15]  # strided slice
    idx = ops.nearest(z_t.to(ops.device), e_s.to(ops.device), False).cpu()
    assert_same_or_near_tie(idx, q.nearest_code_ref(z, e_s.contiguous()), z, e_s, False)


def _peak_bytes(fn):
    """High-water mark of the tensor memory allocated while fn() runs (replaying the profiler's events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((ev.start_ns(), ev.nbytes()) for ev in prof.profiler.kineto_results.events()
                    if ev.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_nearest_code_memory_does_not_grow_with_N_times_V():
    require_compiled()
    z, e = _codebook_data(4096, 4096, 32, seed=1)  # the dense distance matrix would be 64 MiB
    assert 0 < _peak_bytes(lambda: torch.ops.varcore.nearest_code(z, e, False)) < 4 * 2**20
    with pytest.MonkeyPatch.context() as m:  # and the reference does hold it: the measurement sees it
        m.setenv("VARCORE_BACKEND", "reference")
        assert _peak_bytes(lambda: q.nearest_code(z, e)) > 64 * 2**20


# --------------------------------------------------------------------------------------------- bad input
BAD_NEAREST = [
    (lambda: (torch.zeros(4), torch.zeros(3, 4)), ValueError, "z must be (N, C)"),
    (lambda: (torch.zeros(4, 4), torch.zeros(3, 4, 1)), ValueError, "codebook must be (V, C)"),
    (lambda: (torch.zeros(4, 5), torch.zeros(3, 4)), ValueError, "channels"),
    (lambda: (torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 4)), TypeError, "z must be float32"),
    (lambda: (torch.zeros(4, 4), torch.zeros(3, 4, dtype=torch.float16)), TypeError, "codebook must be float32"),
    (lambda: (torch.zeros(4, 0), torch.zeros(3, 0)), ValueError, "channels"),
    (lambda: (torch.zeros(4, 4), torch.zeros(0, 4)), ValueError, "V=0"),
]


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("make,exc,msg", BAD_NEAREST)
def test_nearest_code_rejects_bad_input(backend, make, exc, msg):
    ops = resolve(backend, NAMES)
    with pytest.raises(exc, match=re.escape(msg)):
        ops.nearest(*make(), False)


def test_nearest_code_simt_channel_limit():
    ops = resolve("simt", NAMES)
    with pytest.raises(ValueError, match="channels on this backend"):
        ops.nearest(torch.zeros(2, 307), torch.zeros(3, 307), False)


def test_python_checks_name_the_argument():
    e = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="z_NC"):
        q.nearest_code([[0.0] * 4], e)
    with pytest.raises(TypeError, match="codebook_VC"):
        q.nearest_code(torch.zeros(2, 4), [[0.0] * 4])
    with pytest.raises(ValueError, match="z_NC"):
        q.nearest_code(torch.zeros(2, 5), e)
    with pytest.raises(ValueError, match="codebook_VC on"):
        q.nearest_code(torch.zeros(2, 4), torch.zeros(3, 4, device="meta"))


# --------------------------------------------------------------------------------------------- op machinery
def test_nearest_code_opcheck():
    require_compiled()
    z, e = _codebook_data(33, 19, 8, seed=2)
    torch.library.opcheck(torch.ops.varcore.nearest_code, (z, e, False))
    torch.library.opcheck(torch.ops.varcore.nearest_code, (z, e, True))


def test_nearest_code_compiles_fullgraph():
    require_compiled()
    z, e = _codebook_data(64, 40, 8, seed=4)

    @torch.compile(fullgraph=True, backend="inductor")
    def quantise(z_NC, codebook_VC):
        return F.embedding(q.nearest_code(z_NC * 1.0, codebook_VC), codebook_VC)

    torch.testing.assert_close(quantise(z, e), e[q.nearest_code_ref(z, e)], atol=0, rtol=0)


def test_dispatch_uses_the_kernel_and_the_backend_switch(monkeypatch):
    require_compiled()
    calls = []
    real = torch.ops.varcore.nearest_code
    monkeypatch.setattr(torch.ops.varcore, "nearest_code", lambda *a: calls.append(1) or real(*a))
    z, e = _codebook_data(10, 12, 4, seed=3)
    ref = q.nearest_code_ref(z, e)
    assert torch.equal(q.nearest_code(z, e), ref) and calls == [1]
    assert torch.equal(q.nearest_code(z.double(), e.double()), ref) and calls == [1]  # float64: reference
    monkeypatch.setenv("VARCORE_BACKEND", "reference")
    assert torch.equal(q.nearest_code(z, e), ref) and calls == [1]
    assert varcore.info(print_report=False)["ops"]["nearest_code"]["cpu"] == "reference"


# --------------------------------------------------------------------------------------------- upsample-sum
USUM_NAMES = {"usum": (None, "upsample_sum")}
SCHEDULE_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def upsample_sum_by_hand(idx_BL, table_VC, patch_nums, groups):
    """Per phi group, the sum of F.interpolate(bicubic) of the gathered code maps (the last scale not resized)."""
    B, C, H = idx_BL.shape[0], table_VC.shape[1], patch_nums[-1]
    out = torch.zeros(B, (max(groups) + 1) * C, H, H)
    offset = 0
    for si, pn in enumerate(patch_nums):
        h = F.embedding(idx_BL[:, offset:offset + pn * pn], table_VC).transpose(1, 2).reshape(B, C, pn, pn)
        offset += pn * pn
        if pn != H:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        out[:, groups[si] * C:(groups[si] + 1) * C] += h
    return out


def _pyramid(B, V, patch_nums, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, sum(pn * pn for pn in patch_nums)), generator=g)


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] != "reference"])
@pytest.mark.parametrize("patch_nums,groups,B,V,C", [
    ((1, 2, 3, 4), [0, 0, 1, 1], 2, 64, 8),
    ((1, 2, 3, 5), [0, 1, 2, 3], 1, 9, 3),
    ((3, 7), [0, 0], 2, 5, 4),
    ((4,), [0], 1, 7, 2),
    ((2, 5, 3, 9), [1, 0, 1, 0], 1, 11, 5),  # a scale larger than the one after it (bicubic downsampling)
    (SCHEDULE_256, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3], 1, 40, 3),
])
def test_upsample_sum_matches_interpolate(backend, patch_nums, groups, B, V, C):
    ops = resolve(backend, USUM_NAMES)
    idx = _pyramid(B, V, patch_nums, seed=V + C)
    table = torch.randn(V, C, generator=torch.Generator().manual_seed(C))
    out = ops.usum(idx.to(ops.device), table.to(ops.device), list(patch_nums), groups).cpu()
    torch.testing.assert_close(out, upsample_sum_by_hand(idx, table, patch_nums, groups), atol=2e-6, rtol=1e-6)


BAD_USUM = [
    (lambda: (torch.zeros(2, 5, dtype=torch.long), [1, 2], [0, 0]), ValueError, "idx values must be in [0, 4)",
     lambda idx: idx.__setitem__((1, 3), 4)),
    (lambda: (torch.zeros(2, 5, dtype=torch.long), [1, 2], [0, 0]), ValueError, "idx values must be in [0, 4)",
     lambda idx: idx.__setitem__((0, 0), -1)),
    (lambda: (torch.zeros(2, 6, dtype=torch.long), [1, 2], [0, 0]), ValueError, "sum(pn^2) = 5", None),
    (lambda: (torch.zeros(2, 5, dtype=torch.int32), [1, 2], [0, 0]), TypeError, "idx must be int64", None),
    (lambda: (torch.zeros(2, 5, dtype=torch.long), [1, 2], [0]), ValueError, "one phi group per scale", None),
    (lambda: (torch.zeros(2, 5, dtype=torch.long), [1, 2], [0, -1]), ValueError, "groups must be in", None),
    (lambda: (torch.zeros(2, 5, dtype=torch.long), [1, 0], [0, 0]), ValueError, "patch_nums must be in", None),
    (lambda: (torch.zeros(5, dtype=torch.long), [1, 2], [0, 0]), ValueError, "idx must be (B, L)", None),
]


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("make,exc,msg,poke", BAD_USUM)
def test_upsample_sum_rejects_bad_input(backend, make, exc, msg, poke):
    ops = resolve(backend, USUM_NAMES)
    idx, patch_nums, groups = make()
    if poke:
        poke(idx)
    if backend == "simt" and "values must be in" in msg:  # the CUDA kernels check each token where they read it
        msg = "idx values must be in [0, V), V = the codebook's rows"
    with pytest.raises(exc, match=re.escape(msg)):
        ops.usum(idx, torch.zeros(4, 3), patch_nums, groups)
    with pytest.raises(TypeError, match="codebook must be float32"):
        ops.usum(torch.zeros(2, 5, dtype=torch.long), torch.zeros(4, 3, dtype=torch.float64), [1, 2], [0, 0])


def test_upsample_sum_opcheck():
    require_compiled()
    idx = _pyramid(2, 10, (1, 2, 4), seed=1)
    torch.library.opcheck(torch.ops.varcore.upsample_sum, (idx, torch.randn(10, 4), [1, 2, 4], [0, 1, 1]))


def _quantizer(share, quant_resi=0.5, patch_nums=(1, 2, 3, 5), V=40, C=6, seed=0):
    from varcore.models.quant import VectorQuantizer2

    torch.manual_seed(seed)
    vq = VectorQuantizer2(V, C, using_znorm=False, v_patch_nums=patch_nums, quant_resi=quant_resi,
                          share_quant_resi=share)
    with torch.no_grad():
        for p in vq.parameters():
            p.normal_()  # biases too, so that counting each group's bias n_k times is checked
    return vq.eval().requires_grad_(False)


@pytest.mark.parametrize("share,quant_resi", [(4, 0.5), (0, 0.5), (1, -0.3), (3, 0.5), (4, 0.0)])
@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 5), SCHEDULE_256])
def test_fused_decode_matches_reference(share, quant_resi, patch_nums):
    require_compiled()
    vq = _quantizer(share, quant_resi, patch_nums)
    gen = torch.Generator().manual_seed(len(patch_nums) + share)
    idx_Bl = [torch.randint(0, 40, (3, pn * pn), generator=gen) for pn in patch_nums]
    phis = vq.phis_for(len(patch_nums))
    expected = q.upsample_sum_ref(idx_Bl, vq.embedding.weight, phis, patch_nums)
    # a sum over up to 10 scales in another order: float32 rounding relative to the sum's magnitude
    tol = dict(atol=4e-6 * float(expected.abs().max()), rtol=1e-5)
    torch.testing.assert_close(vq.idxBl_to_fhat(idx_Bl), expected, **tol)
    hs = [vq.embedding(t).transpose(1, 2).reshape(3, 6, pn, pn) for t, pn in zip(idx_Bl, patch_nums)]
    torch.testing.assert_close(vq.embed_to_fhat(hs, last_one=True), expected, **tol)
    # the partial sums (last_one=False) stay on the reference, and end at the same value
    torch.testing.assert_close(vq.embed_to_fhat(hs)[-1], expected, **tol)


def test_fused_decode_uses_the_kernel_once(monkeypatch):
    require_compiled()
    vq = _quantizer(4)
    calls = []
    real = torch.ops.varcore.upsample_sum
    monkeypatch.setattr(torch.ops.varcore, "upsample_sum", lambda *a: calls.append(a[3]) or real(*a))
    vq.idxBl_to_fhat([torch.randint(0, 40, (2, pn * pn)) for pn in (1, 2, 3, 5)])
    assert calls == [phi_index_table(4, 4)]  # one call; the scales' groups are the phi table


def test_fused_decode_keeps_gradients_on_the_reference():
    require_compiled()
    vq = _quantizer(4).requires_grad_(True)
    idx_Bl = [torch.randint(0, 40, (2, pn * pn)) for pn in (1, 2, 3, 5)]
    f_hat = vq.idxBl_to_fhat(idx_Bl)
    f_hat.square().sum().backward()
    assert vq.embedding.weight.grad is not None and vq.quant_resi.qresi_ls[0].weight.grad is not None


def test_upsample_sum_python_checks():
    vq = _quantizer(4)
    W, phis = vq.embedding.weight, vq.phis_for(4)
    good = [torch.zeros(2, pn * pn, dtype=torch.long) for pn in (1, 2, 3, 5)]
    bad = [t.clone() for t in good]
    bad[2][1, 4] = 40
    with pytest.raises(ValueError, match=re.escape("idx_Bl[2] values must be in [0, 40)")):
        q.upsample_sum(bad, W, phis, (1, 2, 3, 5))
    with pytest.raises(ValueError, match=re.escape("idx_Bl[1] must have shape (2, 4)")):
        q.upsample_sum([good[0], good[0], good[2], good[3]], W, phis, (1, 2, 3, 5))
    with pytest.raises(ValueError, match="4 scales"):
        q.upsample_sum(good[:3], W, phis, (1, 2, 3, 5))
    with pytest.raises(TypeError, match="idx_Bl must be a list"):
        q.upsample_sum(torch.zeros(2, 39, dtype=torch.long), W, phis, (1, 2, 3, 5))


# --------------------------------------------------------------------------------------------- encode
def _msrq_op(backend):
    require_compiled()
    if backend == "simt":
        resolve("simt", NAMES)
        return torch.ops.varcore_simt.msrq_encode
    return torch.ops.varcore.msrq_encode


def _phi_args(vq, SN):
    """(weights, biases, phi_index, ratio) of a quantizer's phi table, as msrq_encode takes them."""
    table = vq.phis_for(SN).detached()
    return table.weights, table.biases, table.groups, table.ratio


def _reference_encode(monkeypatch, vq, f, patch_nums, to_fhat):
    with monkeypatch.context() as m:
        m.setenv("VARCORE_BACKEND", "reference")
        return vq.f_to_idxBl_or_fhat(f, to_fhat=to_fhat, v_patch_nums=patch_nums)


_MSRQ_PHI = [(4, 0.5, False), (0, 0.5, False), (1, 0.5, True), (4, 0.0, False)]
# the emulation is slow: of the 10-scale schedule it runs the shared-phi cases only
_MSRQ_CASES = [(backend, *phi, pn) for backend in ("cpu", "simt") for phi in _MSRQ_PHI
               for pn in ((1, 2, 3, 5), (2, 4), SCHEDULE_256)
               if not (backend == "simt" and pn == SCHEDULE_256 and phi[0] != 4)]


@pytest.mark.parametrize("backend,share,quant_resi,using_znorm,patch_nums", _MSRQ_CASES)
def test_msrq_encode_is_the_reference_bit_for_bit(monkeypatch, backend, share, quant_resi, using_znorm,
                                                  patch_nums):
    op = _msrq_op(backend)
    vq = _quantizer(share, quant_resi, patch_nums, V=40 if backend == "simt" else 300, C=6)
    vq.using_znorm = using_znorm
    H = patch_nums[-1]
    f = torch.randn(2, 6, H, H, generator=torch.Generator().manual_seed(H + share))
    weights, biases, groups, ratio = _phi_args(vq, len(patch_nums))
    idx, f_hats = op(f, vq.embedding.weight, weights, biases, groups, ratio, list(patch_nums), using_znorm, True)
    ref_idx = _reference_encode(monkeypatch, vq, f, patch_nums, to_fhat=False)
    ref_fhat = _reference_encode(monkeypatch, vq, f, patch_nums, to_fhat=True)
    assert torch.equal(idx, torch.cat(ref_idx, dim=1))
    assert len(f_hats) == len(patch_nums)
    for a, b in zip(f_hats, ref_fhat):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    idx_last, (f_hat,) = op(f, vq.embedding.weight, weights, biases, groups, ratio, list(patch_nums), using_znorm,
                            False)
    assert torch.equal(idx_last, idx) and torch.equal(f_hat, f_hats[-1])


def test_encode_dispatches_to_one_fused_call(monkeypatch):
    require_compiled()
    vq = _quantizer(4, patch_nums=SCHEDULE_256, V=64, C=8)
    calls = []
    real = torch.ops.varcore.msrq_encode
    monkeypatch.setattr(torch.ops.varcore, "msrq_encode", lambda *a: calls.append(1) or real(*a))
    f = torch.randn(3, 8, 16, 16)
    idx_Bl = vq.f_to_idxBl_or_fhat(f, to_fhat=False)
    assert calls == [1]
    assert [tuple(t.shape) for t in idx_Bl] == [(3, pn * pn) for pn in SCHEDULE_256]
    assert all(t.is_contiguous() and t.dtype == torch.long for t in idx_Bl)
    # non-square schedules and float64 stay on the reference
    vq.f_to_idxBl_or_fhat(torch.randn(1, 8, 3, 5), to_fhat=False, v_patch_nums=[(1, 1), (2, 3), (3, 5)])
    vq.double().f_to_idxBl_or_fhat(f.double(), to_fhat=False)
    assert calls == [1]


def test_encode_peak_memory_is_not_n_times_v():
    require_compiled()
    vq = _quantizer(4, patch_nums=SCHEDULE_256, V=4096, C=32)
    f = torch.randn(8, 32, 16, 16)
    # the reference's last-scale distance matrix alone is 8 * 256 * 4096 * 4 bytes = 32 MiB
    assert _peak_bytes(lambda: vq.f_to_idxBl_or_fhat(f, to_fhat=False)) < 4 * 2**20


BAD_MSRQ = [
    (dict(f=torch.zeros(2, 4, 5)), ValueError, "f must be (B, C, H, W)"),
    (dict(f=torch.zeros(2, 4, 5, 5, dtype=torch.float64)), TypeError, "f must be float32"),
    (dict(f=torch.zeros(2, 4, 4, 4)), ValueError, "the last patch size"),
    (dict(f=torch.zeros(2, 3, 5, 5)), ValueError, "channels"),
    (dict(weights=[torch.zeros(4, 4, 1, 1)]), ValueError, "(4, 4, 3, 3) weight"),
    (dict(groups=[0, 0, 1]), ValueError, "phi_index must be in [0, 1)"),
    (dict(groups=[0, 0]), ValueError, "one phi per scale"),
    (dict(patch_nums=[1, 6, 5]), ValueError, "patch_nums must be in [1, patch_nums[-1]]"),
    (dict(biases=[]), ValueError, "differ in length"),
]


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("change,exc,msg", BAD_MSRQ)
def test_msrq_encode_rejects_bad_input(backend, change, exc, msg):
    op = _msrq_op(backend)
    args = dict(f=torch.zeros(2, 4, 5, 5), codebook=torch.zeros(7, 4), weights=[torch.zeros(4, 4, 3, 3)],
                biases=[torch.zeros(4)], groups=[0, 0, 0], ratio=0.5, patch_nums=[1, 2, 5])
    args.update(change)
    with pytest.raises(exc, match=re.escape(msg)):
        op(*args.values(), False, False)


def test_msrq_encode_opcheck():
    require_compiled()
    vq = _quantizer(4, patch_nums=(1, 2, 4), V=20, C=4)
    weights, biases, groups, ratio = _phi_args(vq, 3)
    for partial in (False, True):
        torch.library.opcheck(torch.ops.varcore.msrq_encode, (torch.randn(2, 4, 4, 4), vq.embedding.weight,
                                                              weights, biases, groups, ratio, [1, 2, 4], False,
                                                              partial))


# --------------------------------------------------------------------------------------------- decode steps
def _sampler_run(vq, idx_Bl, patch_nums):
    """The sampler's loop over get_next_autoregressive_input: every (f_hat, next input) pair, cloned."""
    B, C = idx_Bl[0].shape[0], vq.Cvae
    f_hat = torch.zeros(B, C, patch_nums[-1], patch_nums[-1])
    out = []
    for si, (t, pn) in enumerate(zip(idx_Bl, patch_nums)):
        h = vq.embedding(t).transpose_(1, 2).reshape(B, C, pn, pn)  # as the official sampler builds it
        f_hat, nxt = vq.get_next_autoregressive_input(si, len(patch_nums), f_hat, h)
        out.append((f_hat.clone(), nxt.clone()))
    return out


@pytest.mark.parametrize("share,quant_resi", [(4, 0.5), (0, 0.5), (4, 0.0)])
@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 5), SCHEDULE_256])
def test_decode_steps_are_the_reference_bit_for_bit(monkeypatch, share, quant_resi, patch_nums):
    require_compiled()
    vq = _quantizer(share, quant_resi, patch_nums, V=50, C=6)
    idx_Bl = [torch.randint(0, 50, (3, pn * pn)) for pn in patch_nums]
    calls = []
    real = torch.ops.varcore.add_scale_
    monkeypatch.setattr(torch.ops.varcore, "add_scale_", lambda *a: calls.append(1) or real(*a))
    fused_steps, fused_input = _sampler_run(vq, idx_Bl, patch_nums), vq.idxBl_to_var_input(idx_Bl)
    assert len(calls) == 2 * len(patch_nums) - 1
    monkeypatch.setenv("VARCORE_BACKEND", "reference")
    ref_steps, ref_input = _sampler_run(vq, idx_Bl, patch_nums), vq.idxBl_to_var_input(idx_Bl)
    for (f_a, n_a), (f_b, n_b) in zip(fused_steps, ref_steps):
        assert torch.equal(f_a, f_b) and torch.equal(n_a, n_b) and n_a.is_contiguous()
    assert torch.equal(fused_input, ref_input)


def test_add_scale_emulated_matches_cpu():
    resolve("simt", NAMES)
    vq = _quantizer(4, patch_nums=(1, 2, 3, 5), V=30, C=5)
    weights, biases, groups, ratio = _phi_args(vq, 4)
    f_cpu = torch.randn(2, 5, 5, 5)
    f_emu = f_cpu.clone()
    for si, pn in enumerate((1, 2, 3, 5)):
        idx = torch.randint(0, 30, (2, pn * pn))
        args = (idx, vq.embedding.weight, weights[groups[si]], biases[groups[si]], ratio, (2, 3, 5, 0)[si])
        for rows, channels_last in ((True, True), (False, False)):
            a = torch.ops.varcore.add_scale_(f_cpu.clone(), *args, rows, channels_last)
            b = torch.ops.varcore_simt.add_scale_(f_emu.clone(), *args, rows, channels_last)
            assert torch.equal(a, b)
        torch.ops.varcore.add_scale_(f_cpu, *args, True, True)
        torch.ops.varcore_simt.add_scale_(f_emu, *args, True, True)
        assert torch.equal(f_cpu, f_emu)


BAD_ADD_SCALE = [
    (dict(f_hat=torch.zeros(2, 4, 5, 5).transpose(2, 3)), ValueError, "contiguous"),
    (dict(f_hat=torch.zeros(2, 4, 5, 5, dtype=torch.float64)), TypeError, "f_hat must be float32"),
    (dict(idx=torch.zeros(2, 5, dtype=torch.long)), ValueError, "pn^2 tokens"),
    (dict(idx=torch.full((2, 4), 7)), ValueError, "add_scale_: idx values must be in [0, 7)"),
    (dict(weight=torch.zeros(4, 4, 1, 1)), ValueError, "add_scale_: phi 0 must have a (4, 4, 3, 3) weight"),
    (dict(next_pn=6), ValueError, "next_pn must be in [0, 5]"),
    (dict(bias=None), ValueError, "phi_weight and phi_bias together"),
    (dict(codebook=torch.zeros(7, 3)), ValueError, "codebook must be (V, 4)"),
]


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("change,exc,msg", BAD_ADD_SCALE)
def test_add_scale_rejects_bad_input(backend, change, exc, msg):
    require_compiled()
    if backend == "simt":
        resolve("simt", NAMES)
    op = torch.ops.varcore_simt.add_scale_ if backend == "simt" else torch.ops.varcore.add_scale_
    args = dict(f_hat=torch.zeros(2, 4, 5, 5), idx=torch.zeros(2, 4, dtype=torch.long), codebook=torch.zeros(7, 4),
                weight=torch.zeros(4, 4, 3, 3), bias=torch.zeros(4), ratio=0.5, next_pn=3)
    args.update(change)
    if backend == "simt" and "values must be in" in msg:  # the CUDA kernels check each token where they read it
        msg = "idx values must be in [0, V), V = the codebook's rows"
    snapshot = args["f_hat"].clone()
    with pytest.raises(exc, match=re.escape(msg)):
        op(*args.values(), True, False)
    assert torch.equal(args["f_hat"], snapshot)  # nothing written before the checks


def test_add_scale_opcheck():
    require_compiled()
    args = (torch.randn(2, 4, 5, 5), torch.randint(0, 7, (2, 9)), torch.randn(7, 4), torch.randn(4, 4, 3, 3),
            torch.randn(4), 0.5)
    torch.library.opcheck(torch.ops.varcore.add_scale_, (*args, 4, True, True))
    torch.library.opcheck(torch.ops.varcore.add_scale_, (*args, 0, False, False))


@pytest.mark.parametrize("share", [0, 1, 2, 4])
def test_phi_table_gives_the_fused_path_the_quantizer_parameters(share, monkeypatch):
    """The fused kernels take the phi parameters from the PhiTable, not from the modules: a table whose tensors
    differ from its callables changes the fused decode and not the reference; a plain list of the same modules
    runs the reference."""
    torch.manual_seed(share)
    vq = VectorQuantizer2(16, 8, using_znorm=False, beta=0.25, default_qresi_counts=0, v_patch_nums=(1, 2, 3, 4),
                          quant_resi=0.5, share_quant_resi=share)
    SN = 4
    table = vq.phis_for(SN)
    assert list(table) == [vq.quant_resi[si / (SN - 1)] for si in range(SN)]
    assert len(table.weights) == table.num_groups and table.ratio == 0.5
    idx_Bl = [torch.randint(0, 16, (2, pn * pn)) for pn in (1, 2, 3, 4)]
    with torch.no_grad():
        fused = q.upsample_sum(idx_Bl, vq.embedding.weight, table, (1, 2, 3, 4))
        plain = q.upsample_sum(idx_Bl, vq.embedding.weight, list(table), (1, 2, 3, 4))
        ref = q.upsample_sum_ref(idx_Bl, vq.embedding.weight, table, (1, 2, 3, 4))
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(plain, ref)
        zeroed = q.PhiTable(table, table.groups, [torch.zeros_like(w) for w in table.weights], table.biases, 0.5)
        changed = q.upsample_sum(idx_Bl, vq.embedding.weight, zeroed, (1, 2, 3, 4))
    if extension.use_kernel("upsample_sum", torch.device("cpu")):
        assert not torch.allclose(changed, ref, atol=1e-3)
    with pytest.raises(ValueError, match="groups"):
        q.PhiTable(table, [0, 2, 2, 2], table.weights, table.biases, 0.5)
    with pytest.raises(ValueError, match="one tensor per group"):
        q.PhiTable(table, table.groups, table.weights[:1] * (table.num_groups + 1), table.biases, 0.5)


@pytest.mark.parametrize("share,quant_resi,patch_nums", [(4, 0.5, (1, 2, 3, 5)), (0, 0.5, (1, 2, 4)),
                                                         (1, -0.3, (2, 3, 5)), (4, 0.0, (1, 2, 3, 5))])
def test_msrq_encode_and_add_scale_equal_their_references(share, quant_resi, patch_nums):
    """The op-named functions against their ``*_ref`` on the CPU: the fused encode and the fused decode steps give
    the references' results bit for bit (same float order and layouts), and the references' inputs stay intact."""
    vq = _quantizer(share, quant_resi, patch_nums, seed=share)
    phis, W, SN = vq.phis_for(len(patch_nums)), vq.embedding.weight, len(patch_nums)
    torch.manual_seed(1)
    f = torch.randn(3, W.shape[1], patch_nums[-1], patch_nums[-1])
    for to_fhat in (False, True):
        out, ref = q.msrq_encode(f, W, phis, patch_nums, to_fhat), q.msrq_encode_ref(f, W, phis, patch_nums, to_fhat)
        assert len(out) == len(ref) == SN and all(torch.equal(a, b) for a, b in zip(out, ref))
    idx_Bl = q.msrq_encode(f, W, phis, patch_nums, False)
    f_hat, f_ref = torch.zeros_like(f), torch.zeros_like(f)
    for si, pn in enumerate(patch_nums):
        h = F.embedding(idx_Bl[si], W).transpose(1, 2).reshape(3, W.shape[1], pn, pn)
        f_hat, nxt = q.add_scale_(si, f_hat, h, phis, patch_nums)
        f_ref, nxt_ref = q.add_scale_ref(si, f_ref, h.clone(), phis, patch_nums)
        assert torch.equal(f_hat, f_ref) and torch.equal(nxt, nxt_ref), si
    torch.testing.assert_close(f_hat, q.msrq_encode(f, W, phis, patch_nums, True)[-1], atol=1e-5, rtol=0)
