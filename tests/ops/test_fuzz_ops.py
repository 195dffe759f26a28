"""Hypothesis fuzzing of every compiled op (CPU kernel and emulated CUDA kernel) against its reference.

Random shapes (zero and one included: empty batches, channels and reductions), dtypes, strides and values, and
now and then an invalid argument (an index out of range, a grid that M does not divide, a visible_end beyond Lk, a
channel mismatch). For a valid case the kernel must give the reference's result; for an invalid one it must raise
an ordinary Python exception (a crash fails the run, and under scripts/sanitize.sh an out-of-bounds access does
too). ``test_degenerate_sizes.py`` sets every size of every op to 0 and to 1 systematically.

Each op runs ``QUICK`` examples in the default run and 500 under ``-m slow``:
``pytest tests/ops/test_fuzz_ops.py -m slow``.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from varcore.ops import attention as att, par_order as po, quant as q

from backends import require_compiled, require_simt
from test_attention import TOL, oracle
from test_quant import _phi_args, _quantizer, assert_same_or_near_tie, upsample_sum_by_hand

QUICK = int(os.environ.get("VARCORE_FUZZ_QUICK", "40"))
FULL = 500
KERNEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def _examples():
    return [pytest.param(QUICK, id="quick"), pytest.param(FULL, id="full", marks=pytest.mark.slow)]


def _backends():
    return [pytest.param("cpu"), pytest.param("simt", marks=pytest.mark.simt)]


def _ops(backend):
    require_compiled()
    if backend == "simt":
        require_simt()
        return torch.ops.varcore_simt
    return torch.ops.varcore


def _fuzz(n, body):
    """Run ``body(data)`` on ``n`` hypothesis examples (derandomized: CI sees the same cases every run)."""
    settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
             )(given(data=st.data())(body))()


def _expect_same_failure(ref_fn, kernel_fn):
    """Run the reference; if it refuses the input, the kernel must refuse it too (with an exception, no crash).
    Returns (reference result, kernel result), or None when both refused."""
    try:
        want = ref_fn()
    except (ValueError, TypeError):
        with pytest.raises(KERNEL_ERRORS):
            kernel_fn()
        return None
    return want, kernel_fn()


def _same_bits_or_both_refuse(ref_fn, kernel_fn):
    got = _expect_same_failure(ref_fn, kernel_fn)
    if got is not None:
        assert torch.equal(_bits(got[1]), _bits(got[0]))


def _bits(t):
    """Bit pattern of a tensor (so NaN payloads compare equal)."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def _payload(data, shape, dtype):
    """Random values, with NaN, inf and -0.0 sprinkled into float payloads."""
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(max(info.min, -2 ** 31), min(info.max, 2 ** 31 - 1), shape, generator=g,
                             dtype=torch.int64).to(dtype)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1e3
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=torch.float64)
    pick = torch.randint(0, 20, shape, generator=g)
    x = torch.where(pick < 4, specials[pick.clamp(max=3)], x)
    return x.to(dtype)


def _maybe_strided(data, x):
    """``x`` itself, a transposed copy read back as a view, or a slice of a wider tensor (same values)."""
    kind = data.draw(st.sampled_from(["contiguous", "sliced", "channels_first"]), label="layout")
    if kind == "sliced" and x.dim() >= 2:
        wide = torch.cat([x, x], dim=-1) if x.shape[-1] else x
        return wide[..., : x.shape[-1]]
    if kind == "channels_first" and x.dim() >= 3:
        return x.movedim(-1, 1).contiguous().movedim(1, -1)
    return x


PAR_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
              torch.bool]


# ---------------------------------------------------------------------------------------------- PAR order
def _grid(data):
    M = data.draw(st.integers(1, 4), label="M")
    R = data.draw(st.integers(1, 5), label="R")
    B = data.draw(st.integers(0, 3), label="B")
    C = data.draw(st.sampled_from([(), (0,), (1,), (3,), (8,)]), label="C")
    dtype = data.draw(st.sampled_from(PAR_DTYPES), label="dtype")
    return M, R, B, C, dtype


@pytest.mark.parametrize("n", _examples())
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_par_gather(backend, n):
    ops = _ops(backend)

    def body(data):
        M, R, B, C, dtype = _grid(data)
        G = M * R + data.draw(st.sampled_from([0, 0, 0, 1]), label="G offset")  # sometimes not a multiple of M
        x = _maybe_strided(data, _payload(data, (B, G, G, *C), dtype))
        _same_bits_or_both_refuse(lambda: po.par_gather_ref(x, M), lambda: ops.par_gather(x, M))

    _fuzz(n, body)


@pytest.mark.parametrize("n", _examples())
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_par_scatter(backend, n):
    ops = _ops(backend)

    def body(data):
        M, R, B, C, dtype = _grid(data)
        L = (M * R) ** 2 + data.draw(st.sampled_from([0, 0, 0, 1, -1]), label="L offset")  # sometimes not square
        x = _maybe_strided(data, _payload(data, (B, max(L, 1), *C), dtype))
        _same_bits_or_both_refuse(lambda: po.par_scatter_ref(x, M), lambda: ops.par_scatter(x, M))

    _fuzz(n, body)


@pytest.mark.parametrize("n", _examples())
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_par_group_scatter(backend, n):
    ops = _ops(backend)

    def body(data):
        M, R, B, C, dtype = _grid(data)
        G = M * R
        canvas = _payload(data, (B, G, G, *C), dtype)
        tokens = _maybe_strided(data, _payload(data, (B, M * M, *C), dtype))
        group = data.draw(st.integers(-1, R * R), label="group")  # -1 and R*R are out of range
        want_canvas, got_canvas = canvas.clone(), canvas.clone()
        got = _expect_same_failure(lambda: po.par_group_scatter_ref_(want_canvas, tokens, group, M),
                                   lambda: ops.par_group_scatter_(got_canvas, tokens, group, M))
        if got is not None:
            assert torch.equal(_bits(got_canvas), _bits(want_canvas))
        else:  # a refused call must not have written anything
            assert torch.equal(_bits(got_canvas), _bits(canvas))

    _fuzz(n, body)


# ---------------------------------------------------------------------------------------------- attention
@st.composite
def _attention_case(draw, backend):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]
                                 + ([torch.float64] if backend == "cpu" else [])))
    layout = draw(st.sampled_from(["bhld", "blhd"]))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 3, 8, 16, 33, 64] if backend == "cpu" else [1, 8, 16, 40]))
    Lk = draw(st.integers(1, 40 if backend == "cpu" else 24))
    Lq = draw(st.integers(1, Lk))
    ends = draw(st.lists(st.integers(0, Lk), min_size=Lq, max_size=Lq))
    if draw(st.integers(0, 9)) == 0:  # invalid: beyond the keys or negative
        ends[draw(st.integers(0, Lq - 1))] = draw(st.sampled_from([Lk + 1, -1, Lk + 1000]))
    magnitude = draw(st.sampled_from([1.0, 4.0] if dtype in (torch.float16, torch.bfloat16) else [1.0, 30.0]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return dtype, layout, B, H, D, Lq, Lk, torch.tensor(ends, dtype=torch.int32), magnitude, seed


def _qkv(case):
    dtype, layout, B, H, D, Lq, Lk, ends, magnitude, seed = case
    g = torch.Generator().manual_seed(seed)

    def one(L):
        t = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * magnitude).to(dtype)
        return t.transpose(1, 2).contiguous() if layout == "blhd" else t

    return one(Lq), one(Lk), one(Lk)


def _max_err(got, want):
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf pattern differs"
    return (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0


def _check_against_oracle(name, got, ref, want, tol, rounding=0.0):
    """``got`` (kernel) is as close to the float64 oracle ``want`` as ``TOL`` allows, or at most 4x as far as the
    reference in the same dtype (``ref``), or within ``rounding``: large logits are ill-conditioned for any
    implementation (a float32 logit s carries an error of |s| * eps, which the softmax turns into a relative
    error of that size), and the kernel's backward forms ``dp - rowsum(dO * O)`` as flash attention does, a
    difference whose rounding is eps * |dO| |V| however small the result."""
    err, err_ref = _max_err(got, want), _max_err(ref, want)
    scale = max(1.0, want[torch.isfinite(want)].abs().max().item() if torch.isfinite(want).any() else 0.0)
    bound = max(tol * scale, 4 * err_ref, rounding)
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (reference's {err_ref:.3g})"


@pytest.mark.parametrize("n", _examples())
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_block_causal_attention(backend, n):
    """Forward and backward against a float64 oracle; invalid visible_end refused by the kernel."""
    ops = _ops(backend)

    def body(data):
        case = data.draw(_attention_case(backend), label="case")
        dtype, layout, B, H, D, Lq, Lk, ends, _, seed = case
        q_, k_, v_ = _qkv(case)
        scale = D ** -0.5
        if int(ends.min()) < 0 or int(ends.max()) > Lk:
            with pytest.raises(KERNEL_ERRORS, match="visible_end"):
                ops.block_causal_attention(q_, k_, v_, ends, scale, layout)
            return
        out, lse = ops.block_causal_attention(q_, k_, v_, ends, scale, layout)
        g = torch.Generator().manual_seed(seed + 1)
        g_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
        g_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
        grads = ops.block_causal_attention_backward(g_out, q_, k_, v_, out, lse, ends, scale, layout, g_lse)
        sees = (ends > 0)[None, None, :]

        def forward_backward(fn, cast):
            """(out, lse, dq, dk, dv) of ``fn`` on the inputs cast by ``cast``, by autograd."""
            leaves = [cast(t).requires_grad_() for t in (q_, k_, v_)]
            o, l = fn(*leaves)
            ((o.double() * g_out.double()).sum() + (torch.where(sees, l.double(), 0) * g_lse.double()).sum()
             ).backward()
            return (o.detach(), l.detach(), *(t.grad for t in leaves))

        def as_bhld(t):
            return t.transpose(1, 2) if layout == "blhd" else t

        # the oracle's out is (B, H, L, D); the kernel's and the reference's are in the input layout
        want = forward_backward(lambda a, b, c: (lambda o, l: (as_bhld(o), l))(*oracle(a, b, c, ends, scale, layout)),
                                lambda t: t.double())
        ref = forward_backward(lambda a, b, c: att.block_causal_attention_ref(a, b, c, ends, scale, layout),
                               lambda t: t.detach().clone())
        got = (out, lse, *grads)
        # the rounding of dp - rowsum(dO * O), carried into dq (times |K| scale) and dk (times |Q| scale), summed
        # over up to Lk keys
        eps = torch.finfo(dtype).eps
        amax = [t.double().abs().max().item() for t in (q_, k_, v_, g_out)]
        cancel = 8 * eps * D * amax[3] * amax[2] * max(amax[0], amax[1]) * scale * Lk
        # and the backward recomputes p = exp(s - lse): a logit's rounding eps * |s| is a relative error of p
        logit = 4 * eps * D * amax[0] * amax[1] * scale
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            g_i, r_i, w_i = got[i], ref[i], want[i]
            size = max(1.0, w_i[torch.isfinite(w_i)].abs().max().item() if torch.isfinite(w_i).any() else 0.0)
            rounding = logit * size * (Lq if i >= 2 else 1) + (cancel if name in ("dq", "dk") else 0.0)
            _check_against_oracle(name, g_i, r_i, w_i, TOL[dtype][0 if i < 2 else 1], rounding)

    _fuzz(n, body)


# ---------------------------------------------------------------------------------------------- quantiser
@pytest.mark.parametrize("n", _examples())
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_nearest_code(backend, n):
    ops = _ops(backend)

    def body(data):
        N = data.draw(st.integers(0, 300), label="N")
        V = data.draw(st.integers(0, 200), label="V")  # V = 0 is invalid
        C = data.draw(st.integers(1, 40 if backend == "cpu" else 24), label="C")
        Cz = C + data.draw(st.sampled_from([0, 0, 0, 0, 1]), label="C mismatch")
        using_znorm = data.draw(st.booleans(), label="using_znorm")
        seed = data.draw(st.integers(0, 2 ** 31 - 1), label="seed")
        g = torch.Generator().manual_seed(seed)
        scale = data.draw(st.sampled_from([1e-3, 1.0, 1e3]), label="scale")
        z = _maybe_strided(data, torch.randn(N, Cz, generator=g) * scale)
        e = torch.randn(V, C, generator=g) * scale
        if data.draw(st.booleans(), label="duplicate codes") and V > 1:
            e[V // 2:] = e[: V - V // 2].clone()  # ties: the first code must win
        if V == 0 or Cz != C:
            with pytest.raises(KERNEL_ERRORS):
                ops.nearest_code(z, e, using_znorm)
            return
        idx = ops.nearest_code(z, e, using_znorm)
        if N == 0:  # no rows: an empty (0,) index tensor
            assert idx.shape == (0,) and idx.dtype == torch.long
            return
        assert_same_or_near_tie(idx, q.nearest_code_ref(z.contiguous(), e, using_znorm), z, e, using_znorm)

    _fuzz(n, body)


@st.composite
def _schedule(draw, max_pn):
    """A square patch schedule: scales in any order of size (bicubic may even downsample), last one = H."""
    return draw(st.lists(st.integers(1, max_pn), min_size=1, max_size=5))


@pytest.mark.parametrize("n", _examples())
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_upsample_sum(backend, n):
    ops = _ops(backend)

    def body(data):
        patch_nums = data.draw(_schedule(9), label="patch_nums")
        groups = data.draw(st.lists(st.integers(0, 3), min_size=len(patch_nums), max_size=len(patch_nums)),
                           label="groups")
        B, V, C = (data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 50), label="V"),
                   data.draw(st.integers(1, 8), label="C"))
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="seed"))
        idx = torch.randint(0, V, (B, sum(p * p for p in patch_nums)), generator=g)
        if data.draw(st.integers(0, 9), label="poison") == 0:  # one index out of range
            idx[0, data.draw(st.integers(0, idx.shape[1] - 1))] = data.draw(st.sampled_from([-1, V, 2 ** 40]))
        table = torch.randn(V, C, generator=g)
        if int(idx.min()) < 0 or int(idx.max()) >= V:
            with pytest.raises(KERNEL_ERRORS, match="idx"):
                ops.upsample_sum(idx, table, patch_nums, groups)
            return
        out = ops.upsample_sum(idx, table, patch_nums, groups)
        want = upsample_sum_by_hand(idx, table, patch_nums, groups)
        torch.testing.assert_close(out[:, :want.shape[1]], want, atol=2e-5, rtol=1e-5)
        assert out.shape[1] == (max(groups) + 1) * C

    _fuzz(n, body)


def _increasing_schedule():
    """2 to 4 increasing scales up to 7 (VAR's quantiser needs at least two)."""
    return st.lists(st.integers(1, 7), min_size=2, max_size=4, unique=True).map(lambda pns: tuple(sorted(pns)))


def _reference(fn):
    os.environ["VARCORE_BACKEND"] = "reference"
    try:
        return fn()
    finally:
        del os.environ["VARCORE_BACKEND"]


@pytest.mark.parametrize("n", _examples())
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_msrq_encode(backend, n):
    """The whole encode pyramid, bit for bit against the reference quantiser."""
    ops = _ops(backend)

    def body(data):
        patch_nums = data.draw(_increasing_schedule(), label="patch_nums")
        share = data.draw(st.sampled_from([0, 1, 4]), label="share")
        quant_resi = data.draw(st.sampled_from([0.5, 0.0]), label="quant_resi")
        using_znorm = data.draw(st.booleans(), label="using_znorm")
        V, C, B = (data.draw(st.integers(1, 40), label="V"), data.draw(st.integers(1, 6), label="C"),
                   data.draw(st.integers(1, 2), label="B"))
        vq = _quantizer(share, quant_resi, patch_nums, V=V, C=C, seed=data.draw(st.integers(0, 99), label="w"))
        vq.using_znorm = using_znorm
        H = patch_nums[-1]
        f = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
        weights, biases, groups, ratio = _phi_args(vq, len(patch_nums))
        idx, f_hats = ops.msrq_encode(f, vq.embedding.weight, weights, biases, groups, ratio, list(patch_nums),
                                      using_znorm, True)
        ref_idx = _reference(lambda: vq.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=patch_nums))
        ref_fhat = _reference(lambda: vq.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=patch_nums))
        assert torch.equal(idx, torch.cat(ref_idx, dim=1))
        # bit for bit, except with a single channel, where ATen's conv (phi) takes another algorithm: a few ulp
        tol = dict(atol=0, rtol=0) if C > 1 else dict(atol=1e-6, rtol=1e-6)
        for a, b in zip(f_hats, ref_fhat):
            torch.testing.assert_close(a, b, **tol)

    _fuzz(n, body)


@pytest.mark.parametrize("n", _examples())
@pytest.mark.parametrize("backend", _backends())
def test_fuzz_add_scale(backend, n):
    """One decode step (gather, bicubic, phi, add, area) in both output layouts, bit for bit against the
    reference step; an index out of range is refused before f_hat is touched."""
    ops = _ops(backend)

    def body(data):
        patch_nums = data.draw(_increasing_schedule(), label="patch_nums")
        SN, H = len(patch_nums), patch_nums[-1]
        V, C, B = (data.draw(st.integers(1, 30), label="V"), data.draw(st.integers(1, 5), label="C"),
                   data.draw(st.integers(1, 2), label="B"))
        vq = _quantizer(data.draw(st.sampled_from([0, 4]), label="share"), 0.5, patch_nums, V=V, C=C)
        weights, biases, groups, ratio = _phi_args(vq, SN)
        si = data.draw(st.integers(0, SN - 1), label="si")
        pn, next_pn = patch_nums[si], 0 if si == SN - 1 else patch_nums[si + 1]
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 999), label="seed"))
        f_hat = torch.randn(B, C, H, H, generator=g)
        idx = torch.randint(0, V, (B, pn * pn), generator=g)
        poisoned = data.draw(st.integers(0, 9), label="poison") == 0
        if poisoned:
            idx[-1, -1] = data.draw(st.sampled_from([-1, V]))
        rows = data.draw(st.booleans(), label="rows") and next_pn > 0
        channels_last = data.draw(st.booleans(), label="channels_last")
        args = (idx, vq.embedding.weight, weights[groups[si]], biases[groups[si]], ratio, next_pn, rows,
                channels_last)
        got_f = f_hat.clone()
        if poisoned:
            with pytest.raises(KERNEL_ERRORS, match="idx"):
                ops.add_scale_(got_f, *args)
            assert torch.equal(got_f, f_hat)
            return
        nxt = ops.add_scale_(got_f, *args)
        want = torch.ops.varcore.add_scale_(f_hat.clone(), *args) if backend == "simt" else None
        # reference: h = phi(bicubic(embedding)) (last scale: as it is), f_hat += h, then area to next_pn
        h = F.embedding(idx, vq.embedding.weight).transpose(1, 2).reshape(B, C, pn, pn)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        ref_f = f_hat.clone()
        _, ref_next = _reference(lambda: q.add_scale_(si, ref_f, h, vq.phis_for(SN), patch_nums))
        torch.testing.assert_close(got_f, ref_f, atol=1e-5, rtol=1e-5)
        if next_pn:
            ref_rows = ref_next.reshape(B, C, -1).transpose(1, 2) if rows else ref_next
            torch.testing.assert_close(nxt, ref_rows, atol=1e-5, rtol=1e-5)
        if want is not None:  # the emulated CUDA kernel and the CPU kernel agree exactly
            assert torch.equal(nxt, want)

    _fuzz(n, body)


# ---------------------------------------------------------------------------------------------- few-row linear
@pytest.mark.parametrize("n", _examples())
def test_fuzz_decode_linear(n):
    """CPU only (the op has no CUDA kernel): the packing bit-exact, the product within float32 rounding, and a
    wrong ``out_features`` refused."""
    from varcore.ops import linear as lin
    ops = _ops("cpu")

    def body(data):
        R = data.draw(st.integers(0, 70), label="R")
        K = data.draw(st.integers(0, 150), label="K")  # K = 0: an empty sum, zeros
        N = data.draw(st.integers(1, 200), label="N")
        seed = data.draw(st.integers(0, 2 ** 31 - 1), label="seed")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(N, K, generator=g)
        x = _maybe_strided(data, torch.randn(R, K, generator=g))
        packed = ops.decode_linear_pack(w)
        assert torch.equal(packed, lin.decode_linear_pack_ref(w))
        out_features = N + data.draw(st.sampled_from([0, 0, 0, 0, 64, -N]), label="out_features offset")
        if not (packed.shape[0] - 1) * lin.PANEL < out_features <= packed.shape[0] * lin.PANEL:
            with pytest.raises(KERNEL_ERRORS):
                ops.decode_linear(x, packed, out_features)
            return
        got = ops.decode_linear(x, packed, out_features)
        torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5 * K ** 0.5)

    _fuzz(n, body)
