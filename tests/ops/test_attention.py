"""Block-causal attention: every backend (reference, CPU kernel, emulated CUDA kernel, CUDA) against an
independent float64 oracle on VAR's real schedules, CoDe prefixes, PAR groups and random block layouts; gradients
(op backward, autograd, gradcheck); the mask builders against the spec's definitions; bad input; opcheck; attend."""
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import varcore
from varcore.ops import attention as att

from backends import backend_params, require_compiled, resolve

NAMES = {
    "fwd": (att.block_causal_attention_ref, "block_causal_attention"),
    "bwd": (att.block_causal_attention_backward_ref, "block_causal_attention_backward"),
}
VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Max error allowed, relative to max(1, largest reference magnitude); forward and gradients.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5), torch.float16: (2e-3, 4e-3),
       torch.bfloat16: (1.6e-2, 3e-2)}


# ---------------------------------------------------------------------------------------------- oracle
def dense_mask(ends, Lk):
    mask = torch.zeros(len(ends), Lk, dtype=torch.bool)
    for i, e in enumerate(ends.tolist()):
        mask[i, :e] = True
    return mask


def oracle(q, k, v, ends, scale, layout="bhld"):
    """float64 masked softmax attention, (out, lse) in the (B, H, L, D) layout; differentiable."""
    q, k, v = (t.double() for t in (q, k, v))
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = dense_mask(ends, k.shape[2])
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    sees = mask.any(-1)[:, None]
    p = torch.where(sees, torch.softmax(s, -1), 0.0)
    return p @ v, torch.logsumexp(s, -1)


def bhld(t, layout):
    return t.transpose(1, 2) if layout == "blhd" else t


def assert_close(name, got, want, tol):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{name}: -inf pattern differs"
    finite = torch.isfinite(want)
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    bound = tol * max(1.0, want[finite].abs().max().item() if finite.any() else 0.0)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def make_qkv(B, H, Lq, Lk, D, dtype, layout, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def one(L):
        t = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
        return bhld(t, layout).contiguous().to(device)

    return one(Lq), one(Lk), one(Lk)


def check_forward(ops, q, k, v, ends, layout, dtype):
    scale = q.shape[-1] ** -0.5
    out, lse = ops.fwd(q, k, v, ends.to(q.device), scale, layout)
    want_out, want_lse = oracle(q.cpu(), k.cpu(), v.cpu(), ends, scale, layout)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close("out", bhld(out, layout), want_out, TOL[dtype][0])
    assert_close("lse", lse, want_lse, TOL[dtype][0])
    return out, lse


def check_backward(ops, q, k, v, ends, layout, dtype, seed=0):
    scale = q.shape[-1] ** -0.5
    out, lse = ops.fwd(q, k, v, ends.to(q.device), scale, layout)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype).to(q.device)
    grad_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype).to(q.device)
    grads = ops.bwd(grad_out, q, k, v, out, lse, ends.to(q.device), scale, layout, grad_lse)
    leaves = [t.cpu().double().requires_grad_() for t in (q, k, v)]
    o, l = oracle(*leaves, ends, scale, layout)
    sees = dense_mask(ends, k.shape[1 if layout == "blhd" else 2]).any(-1)
    loss = (bhld(o, layout) * grad_out.cpu().double()).sum() + (torch.where(sees, l, 0) * grad_lse.cpu().double()).sum()
    loss.backward()
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert got.shape == leaf.shape and got.dtype == dtype
        assert_close(name, got, leaf.grad, TOL[dtype][1])


# ---------------------------------------------------------------------------------------------- cases
def var_case(patch_nums):
    ends = att.var_visible_end(patch_nums)
    return ends, len(ends)


def code_case(N, cached):
    ends = att.code_prefill_visible_end(VAR_256, N, cached)
    return ends, int(ends.max())


def par_case(M, L):
    seq = L + M * M - 1
    return att.par_visible_end(seq, M), seq


# (name, ends, Lk, D): sizes the CPU kernel and reference run quickly.
CPU_CASES = [
    ("var256", *var_case(VAR_256), 64),
    ("var256-d128", *var_case(VAR_256), 128),
    ("var256-d100", *var_case(VAR_256), 100),
    ("code-n6", *code_case(6, 0), 64),
    ("code-n7-cached3", *code_case(7, 3), 64),
    ("code-n8-cached5", *code_case(8, 5), 64),
    ("code-n9-cached8", *code_case(9, 8), 64),
    ("par-m2", *par_case(2, 256), 64),
    ("par-m4", *par_case(4, 256), 100),
    ("odd", torch.tensor([3, 0, 7, 7, 13, 1, 20, 29]), 29, 37),
]
# Tiny cases for the emulated CUDA kernel (a 128-thread block costs a few ms).
TINY_CASES = [
    ("tiny-var", *var_case((1, 2, 3, 4)), 64),
    ("tiny-var-d100", *var_case((1, 2, 3, 5)), 100),
    ("tiny-code-cached", torch.tensor([14] * 9 + [30] * 16), 30, 64),
    ("tiny-par-m2", *par_case(2, 36), 32),
    ("tiny-par-m4", *par_case(4, 64), 16),
    ("tiny-odd", torch.tensor([3, 0, 7, 7, 13, 1, 20, 29, 29]), 29, 24),
]


def cases_for(backend):
    return TINY_CASES if backend in ("simt",) else CPU_CASES + TINY_CASES


def case_params(which):
    return [pytest.param(b, c, id=f"{b}-{c[0]}", marks=p.marks)
            for p in backend_params() for b in p.values for c in cases_for(b) if which(b, c)]


# ---------------------------------------------------------------------------------------------- masks
def test_var_visible_end_matches_scale_ids():
    ends = att.var_visible_end(VAR_256)
    assert len(ends) == 680 and int(ends[0]) == 1 and int(ends[-1]) == 680
    scale_id = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(VAR_256)])
    assert torch.equal(att.visible_end_mask(ends, 680), scale_id[None, :] <= scale_id[:, None])
    assert len(att.var_visible_end(VAR_512)) == 2240


def test_code_prefill_visible_end():
    full = att.var_visible_end(VAR_256)
    for N in range(6, 10):
        ends = att.code_prefill_visible_end(VAR_256, N)
        P = sum(pn * pn for pn in VAR_256[:N + 1])
        assert torch.equal(ends, full[:P])
        suffix = att.code_prefill_visible_end(VAR_256, N, cached_scales=N)
        assert torch.equal(suffix, full[P - VAR_256[N] ** 2:P])
    assert len(att.code_prefill_visible_end(VAR_256, 8)) == 424  # spec A.3: N=8 -> P=424


@pytest.mark.parametrize("M,L", [(2, 16), (2, 36), (4, 64), (2, 576), (4, 576)])
def test_par_visible_end_matches_spec(M, L):
    T = L + M * M - 1
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))  # spec B.3, written as described
    mask[:, 0] = True
    i = 0
    while M * M + i * M * M < T:
        start, stop = M * M + i * M * M, M * M + (i + 1) * M * M
        mask[start:stop, :stop] = True
        i += 1
    assert torch.equal(att.visible_end_mask(att.par_visible_end(T, M), T), mask)


# ---------------------------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("backend,case", case_params(lambda b, c: True))
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_forward_float32(backend, case, layout):
    ops = resolve(backend, NAMES)
    _, ends, Lk, D = case
    q, k, v = make_qkv(2, 2, len(ends), Lk, D, torch.float32, layout, seed=Lk + D, device=ops.device)
    check_forward(ops, q, k, v, ends, layout, torch.float32)


HALF_CASES = ("var256", "par-m4", "odd", "tiny-var", "tiny-par-m4")


@pytest.mark.parametrize("backend,case", case_params(lambda b, c: c[0] in HALF_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_precision(backend, case, dtype):
    ops = resolve(backend, NAMES)
    _, ends, Lk, D = case
    q, k, v = make_qkv(1, 2, len(ends), Lk, D, dtype, "bhld", seed=3, device=ops.device)
    check_forward(ops, q, k, v, ends, "bhld", dtype)


@pytest.mark.parametrize("backend,case", case_params(lambda b, c: c[0] not in ("var256-d128",)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(backend, case, dtype):
    ops = resolve(backend, NAMES)
    _, ends, Lk, D = case
    layout = "blhd" if dtype == torch.float16 else "bhld"
    q, k, v = make_qkv(1, 2, len(ends), Lk, D, dtype, layout, seed=5, device=ops.device)
    check_backward(ops, q, k, v, ends, layout, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_var_512(backend):
    ops = resolve(backend, NAMES)
    ends, L = var_case(VAR_512)
    q, k, v = make_qkv(1, 2, L, L, 64, torch.float32, "bhld", seed=11)
    check_forward(ops, q, k, v, ends, "bhld", torch.float32)
    check_backward(ops, q, k, v, ends, "bhld", torch.float32)


def test_var_512_forward_cpu():
    ops = resolve("cpu", NAMES)
    ends, L = var_case(VAR_512)
    q, k, v = make_qkv(1, 1, L, L, 64, torch.float32, "blhd", seed=12)
    check_forward(ops, q, k, v, ends, "blhd", torch.float32)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpu_instruction_set_variants(isa, monkeypatch):
    ops = resolve("cpu", NAMES)
    monkeypatch.setenv("VARCORE_CPU_ISA", isa)
    for _, ends, Lk, D in (CPU_CASES[0], CPU_CASES[-1], TINY_CASES[1]):
        q, k, v = make_qkv(1, 2, len(ends), Lk, D, torch.float32, "bhld", seed=D)
        check_forward(ops, q, k, v, ends, "bhld", torch.float32)
        check_backward(ops, q, k, v, ends, "bhld", torch.float32)
    q, k, v = make_qkv(1, 2, 30, 30, 64, torch.bfloat16, "bhld", seed=1)
    check_backward(ops, q, k, v, att.var_visible_end((1, 2, 3, 4)), "bhld", torch.bfloat16)


def tile_edge_layout(sizes, drop, overrides):
    """Block-causal ends for blocks of the given sizes, queries the last len - drop positions, then some rows
    set to other ends ({row: end}: rows that see nothing, only an early prefix, or past their block)."""
    bounds = torch.tensor(sizes).cumsum(0)
    ends = torch.repeat_interleave(bounds, torch.tensor(sizes))[drop:].clone()
    for row, end in overrides.items():
        ends[row] = end
    return ends, int(bounds[-1])


# Block edges on both sides of the CPU kernel's 64-row / 64-key tiles and inside its row blocks (6 or 4 rows),
# Lq and Lk multiples of neither; rows that see nothing or little in the middle of a tile's visible range; one
# case with a single head (the query tiles are then split into several tasks).
TILE_EDGE_CASES = [
    ("edges", tile_edge_layout((63, 2, 65, 1, 70, 6), 5, {70: 0, 130: 10, 131: 207, 199: 1}), 2, 3, 64),
    ("exact-64", tile_edge_layout((64, 64, 1, 127), 0, {}), 1, 2, 100),
    ("one-head", tile_edge_layout((5, 59, 66, 130, 17), 3, {64: 0, 65: 0, 200: 277}), 1, 1, 40),
]


@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
@pytest.mark.parametrize("case", TILE_EDGE_CASES, ids=[c[0] for c in TILE_EDGE_CASES])
def test_cpu_tile_edges(isa, case, monkeypatch):
    ops = resolve("cpu", NAMES)
    if isa != "native":
        monkeypatch.setenv("VARCORE_CPU_ISA", isa)
    _, (ends, Lk), B, H, D = case
    for dtype in (torch.float32, torch.float64):
        q, k, v = make_qkv(B, H, len(ends), Lk, D, dtype, "blhd", seed=Lk + D)
        check_forward(ops, q, k, v, ends, "blhd", dtype)
        check_backward(ops, q, k, v, ends, "blhd", dtype)


@pytest.mark.simt
@pytest.mark.parametrize("smem_kb", ["32", "160"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_tile_sizes(smem_kb, dtype, monkeypatch):
    """Small tiles (several query and key tiles, skipping) and the large tiles of big-shared-memory GPUs."""
    ops = resolve("simt", NAMES)
    monkeypatch.setenv("VARCORE_SIMT_SMEM_KB", smem_kb)
    ends, L = var_case((1, 2, 3, 4, 5))
    q, k, v = make_qkv(1, 1, L, L, 32, dtype, "bhld", seed=2)
    check_forward(ops, q, k, v, ends, "bhld", dtype)
    check_backward(ops, q, k, v, ends, "bhld", dtype)


@st.composite
def block_layouts(draw):
    """Random block-causal layouts: blocks of random sizes, queries the last Lq positions, a few rows that see
    nothing or that see beyond their block (visible_end need not be monotone)."""
    sizes = draw(st.lists(st.integers(1, 24), min_size=1, max_size=6))
    bounds = torch.tensor(sizes).cumsum(0)
    ends = torch.repeat_interleave(bounds, torch.tensor(sizes))
    Lk = int(bounds[-1])
    Lq = draw(st.integers(1, Lk))
    ends = ends[Lk - Lq:].clone()
    for i in draw(st.lists(st.integers(0, Lq - 1), max_size=3)):
        ends[i] = draw(st.integers(0, Lk))
    return ends, Lk


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "reference"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(layout=block_layouts(), B=st.integers(1, 2), H=st.integers(1, 2), D=st.sampled_from([8, 16, 40, 64]),
       qkv_layout=st.sampled_from(["bhld", "blhd"]))
def test_random_block_layouts(backend, layout, B, H, D, qkv_layout):
    ops = resolve(backend, NAMES)
    ends, Lk = layout
    q, k, v = make_qkv(B, H, len(ends), Lk, D, torch.float32, qkv_layout, seed=Lk * 7 + D)
    check_forward(ops, q, k, v, ends, qkv_layout, torch.float32)
    check_backward(ops, q, k, v, ends, qkv_layout, torch.float32)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "reference"])
def test_strided_inputs_are_read_in_place(backend):
    ops = resolve(backend, NAMES)
    ends, L = var_case((1, 2, 3, 4))
    packed = torch.randn(2, L, 3, 2, 48, device=ops.device)  # (B, L, qkv, H, D): what a fused projection gives
    q, k, v = packed.unbind(2)
    check_forward(ops, q, k, v, ends, "blhd", torch.float32)
    check_backward(ops, q, k, v, ends, "blhd", torch.float32)
    wide = torch.randn(2, 2, L, 96, device=ops.device)[..., ::2]  # head dim not contiguous: copied first
    check_forward(ops, wide, wide, wide, ends, "bhld", torch.float32)


def test_query_that_sees_nothing():
    require_compiled()
    ends = torch.tensor([0, 2, 0, 4])
    q, k, v = (torch.randn(1, 1, 4, 16, requires_grad=True) for _ in range(3))
    out, lse = varcore.ops.block_causal_attention(q, k, v, ends)
    assert torch.equal(out[0, 0, 0], torch.zeros(16)) and torch.isneginf(lse[0, 0, 0])
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------------------------------------- gradients
def test_gradcheck_cpu_kernel_float64():
    require_compiled()
    ends = torch.tensor([1, 3, 3, 0, 6, 6, 9, 9, 9])
    q = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, layout="bhld"):
        out, lse = torch.ops.varcore.block_causal_attention(q, k, v, ends, 0.4, layout)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    blhd = [t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v)]  # strided (B, L, H, D) views
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, "blhd"), blhd)


def test_gradcheck_reference():
    ends = att.par_visible_end(7, 2)
    args = [torch.randn(1, 7, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: att.block_causal_attention_ref(q, k, v, ends, None, "blhd")[0], args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_through_public_op(dtype):
    require_compiled()
    ends, L = var_case((1, 2, 3, 4, 5))
    q, k, v = make_qkv(2, 2, L, L, 64, dtype, "bhld", seed=9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = varcore.ops.block_causal_attention(*leaves, ends)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o, _ = oracle(*ref_leaves, ends, 64 ** -0.5)
    (o * g.double()).sum().backward()
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert_close(f"d{name}", a.grad, b.grad, TOL[dtype][1])


# ---------------------------------------------------------------------------------------------- bad input
def _bad_cases():
    z = torch.zeros
    ve = torch.tensor([1, 2, 3])
    return [
        ("q 3-D", lambda: (z(1, 3, 8), z(1, 1, 3, 8), z(1, 1, 3, 8), ve, "bhld"), ValueError, "4-D"),
        ("k 5-D", lambda: (z(1, 1, 3, 8), z(1, 1, 1, 3, 8), z(1, 1, 3, 8), ve, "bhld"), ValueError, "4-D"),
        ("heads differ", lambda: (z(1, 2, 3, 8), z(1, 1, 3, 8), z(1, 1, 3, 8), ve, "bhld"), ValueError, "head counts"),
        ("k v lengths", lambda: (z(1, 1, 3, 8), z(1, 1, 4, 8), z(1, 1, 3, 8), ve, "bhld"), ValueError, "same length"),
        ("head dims", lambda: (z(1, 1, 3, 8), z(1, 1, 3, 16), z(1, 1, 3, 8), ve, "bhld"), ValueError, "head dim"),
        ("D too large", lambda: (z(1, 1, 3, 300), z(1, 1, 3, 300), z(1, 1, 3, 300), ve, "bhld"), ValueError,
         "head dim must be in [1, 256]"),
        ("int dtype", lambda: (z(1, 1, 3, 8, dtype=torch.int32),) * 3 + (ve, "bhld"), TypeError, "float32"),
        ("mixed dtype", lambda: (z(1, 1, 3, 8), z(1, 1, 3, 8, dtype=torch.float16), z(1, 1, 3, 8), ve, "bhld"),
         TypeError, "share a dtype"),
        ("ve float", lambda: (z(1, 1, 3, 8),) * 3 + (ve.float(), "bhld"), TypeError, "int32 or int64"),
        ("ve length", lambda: (z(1, 1, 3, 8),) * 3 + (torch.tensor([1, 2]), "bhld"), ValueError, "shape (Lq,)"),
        ("ve 2-D", lambda: (z(1, 1, 3, 8),) * 3 + (ve[None], "bhld"), ValueError, "shape (Lq,)"),
        ("ve above Lk", lambda: (z(1, 1, 3, 8),) * 3 + (torch.tensor([1, 2, 4]), "bhld"), ValueError, "[0, Lk]"),
        ("ve negative", lambda: (z(1, 1, 3, 8),) * 3 + (torch.tensor([1, -1, 3], dtype=torch.int32), "bhld"),
         ValueError, "[0, Lk]"),
        ("layout", lambda: (z(1, 1, 3, 8),) * 3 + (ve, "bshd"), ValueError, "layout"),
        ("blhd lengths", lambda: (z(1, 3, 1, 8), z(1, 3, 1, 8), z(1, 3, 1, 8), ve[:1], "blhd"), ValueError,
         "shape (Lq,)"),
    ]


@pytest.mark.parametrize("backend", ["python", "reference", "cpu", "simt"])
@pytest.mark.parametrize("name,make,exc,msg", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_rejected(backend, name, make, exc, msg):
    q, k, v, ve, layout = make()
    if backend == "python":
        call = lambda: varcore.ops.block_causal_attention(q, k, v, ve, None, layout)  # noqa: E731
    else:
        ops = resolve(backend, NAMES)
        call = lambda: ops.fwd(q, k, v, ve, 0.5, layout)  # noqa: E731
    with pytest.raises(exc, match=re.escape(msg)):
        call()


@pytest.mark.parametrize("backend", ["reference", "cpu", "simt"])
def test_backward_bad_input(backend):
    ops = resolve(backend, NAMES)
    q = k = v = torch.randn(1, 1, 3, 8)
    ve = torch.tensor([1, 2, 3])
    out, lse = ops.fwd(q, k, v, ve, 0.5, "bhld")
    with pytest.raises(ValueError, match="head dim"):
        ops.bwd(out, q, torch.randn(1, 1, 3, 4), v, out, lse, ve, 0.5, "bhld", None)
    with pytest.raises(ValueError, match=re.escape("[0, Lk]")):
        ops.bwd(out, q, k, v, out, lse, torch.tensor([1, 2, 9]), 0.5, "bhld", None)
    if backend != "reference":  # the reference takes its shapes from q; the ops check every argument
        with pytest.raises(ValueError, match="grad_out"):
            ops.bwd(out[:, :, :2], q, k, v, out, lse, ve, 0.5, "bhld", None)
        with pytest.raises(TypeError, match="lse"):
            ops.bwd(out, q, k, v, out, lse.double(), ve, 0.5, "bhld", None)


@pytest.mark.simt
def test_emulated_cuda_rejects_float64():
    ops = resolve("simt", NAMES)
    q = torch.zeros(1, 1, 3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.fwd(q, q, q, torch.tensor([1, 2, 3]), 0.5, "bhld")


# ---------------------------------------------------------------------------------------------- op machinery
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(layout, dtype):
    require_compiled()
    ends = torch.tensor([1, 5, 5, 5, 5, 7, 7])
    q, k, v = (bhld(torch.randn(2, 2, 7, 16, dtype=dtype), layout).contiguous().requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.varcore.block_causal_attention, (q, k, v, ends, 0.25, layout))
    out, lse = torch.ops.varcore.block_causal_attention(q, k, v, ends, 0.25, layout)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), ends, 0.25, layout,
            torch.randn_like(lse))
    torch.library.opcheck(torch.ops.varcore.block_causal_attention_backward, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    require_compiled()
    ends = att.var_visible_end((1, 2, 3))

    @torch.compile(fullgraph=True, backend="inductor")
    def block(q, k, v):
        return varcore.ops.block_causal_attention(q * 2, k, v, ends)[0] + 1

    q, k, v = (torch.randn(1, 2, 14, 16) for _ in range(3))
    want, _ = oracle(q * 2, k, v, ends, 0.25)
    assert_close("compiled", block(q, k, v), want + 1, 2e-5)


# ---------------------------------------------------------------------------------------------- attend
def test_attention_backends_report():
    require_compiled()
    report = varcore.ops.attention_backends()
    assert report["cpu"] == {"masked": "kernel", "unmasked": "sdpa"}
    assert set(report["cuda"]) == {"masked", "unmasked"}


@pytest.mark.parametrize("force_reference", [False, True])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_attend(force_reference, layout, monkeypatch):
    if force_reference:
        monkeypatch.setenv("VARCORE_BACKEND", "reference")
    expected = "sdpa" if force_reference or varcore.ops.extension.LIBRARY is None else "kernel"
    assert att.attention_backend("cpu", masked=True) == expected
    ends = att.var_visible_end((1, 2, 3, 4))
    ends[2] = 0
    q, k, v = make_qkv(2, 2, 30, 30, 32, torch.float32, layout, seed=4)
    want, _ = oracle(q, k, v, ends, 0.3, layout)
    assert_close("masked", bhld(att.attend(q, k, v, ends, 0.3, layout), layout), want, 2e-5)
    want_full, _ = oracle(q, k, v, torch.full((30,), 30), 32 ** -0.5, layout)
    assert_close("unmasked", bhld(att.attend(q, k, v, layout=layout), layout), want_full, 2e-5)


# ---------------------------------------------------------------------------------------------- masks and backends
def _masks():
    """(name, ends tensor, Lk): VAR training with a query that sees nothing, a CoDe prefix continuing a cache
    (Lq < Lk), PAR's groups."""
    var = att.var_visible_end((1, 2, 3, 4))
    var[2] = 0
    return [("var", var, 30), ("code-cached", att.code_prefill_visible_end(VAR_256, 4, cached_scales=2), 55),
            ("par", att.par_visible_end(24, 2), 24)]


def test_block_causal_mask_checks_once_and_caches():
    ends = att.var_visible_end((1, 2, 3))
    mask = att.BlockCausalMask(ends)
    assert (mask.Lq, mask.Lk) == (14, 14) and mask.ends == tuple(ends.tolist())
    assert mask.visible_end() is mask.visible_end("cpu") and mask.visible_end().dtype == torch.int32
    assert mask.dense() is mask.dense() and torch.equal(mask.dense(), att.visible_end_mask(ends, 14))
    wide = mask.dense(Lk=20)  # more keys than the mask's (a whole KV cache): the extra ones are invisible
    assert wide.shape == (14, 20) and not wide[:, 14:].any() and torch.equal(wide[:, :14], mask.dense())
    assert torch.equal(att.visible_end_mask(mask, 20), wide)
    for bad, err, what in (([1, -1], ValueError, r"\[0, Lk\]"), ([1, 5], ValueError, r"\[0, Lk\] = \[0, 4\]"),
                           (torch.ones(3), TypeError, "integer tensor"), ([], TypeError, "non-empty"),
                           ([True, 1], TypeError, "ints"), (torch.ones(2, 2, dtype=torch.long), TypeError, "1-D")):
        with pytest.raises(err, match=what):
            att.BlockCausalMask(bad, 4 if bad == [1, 5] else None)
    with pytest.raises(ValueError, match="Lk must be a positive int"):
        att.BlockCausalMask([1, 2], 0)
    q, k, v = make_qkv(1, 2, 14, 14, 8, torch.float32, "bhld", seed=0)
    with pytest.raises(ValueError, match=r"mask is for \(Lq, Lk\) = \(14, 14\), the inputs have \(13, 14\)"):
        att.attend(q[:, :, 1:], k, v, mask)


@pytest.mark.parametrize("name,ends,Lk", _masks(), ids=[m[0] for m in _masks()])
def test_attend_mask_object_equals_tensor_without_reading_values(name, ends, Lk):
    """A BlockCausalMask gives the tensor's result on every CPU route, and the call reads no value on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    q, k, v = make_qkv(2, 2, len(ends), Lk, 16, torch.float32, "bhld", seed=3)
    mask = att.BlockCausalMask(ends, Lk)
    want, _ = oracle(q, k, v, ends, 0.3)
    for backend in ("kernel", "sdpa") if varcore.ops.extension.LIBRARY is not None else ("sdpa",):
        with att.use_attention_backend(backend):
            att.attend(q, k, v, mask, 0.3)  # warm-up: the mask's forms are built on first use
            with Reads():
                got = att.attend(q, k, v, mask, 0.3)
            assert Reads.count == 0, f"{backend}: {Reads.count} host reads"
            assert_close(f"{backend} mask object", got, want, 2e-5)
            assert_close(f"{backend} tensor", att.attend(q, k, v, ends, 0.3), want, 2e-5)


@pytest.mark.parametrize("layout,masks", [("bhld", 1), pytest.param("bhld", 3, marks=pytest.mark.slow),
                                          pytest.param("blhd", 3, marks=pytest.mark.slow)])
def test_flex_route_cpu(layout, masks):
    """FlexAttention (compiled for the CPU: minutes per shape on 2 cores, so the default run takes one mask)
    through attend: the mask object's cached BlockMask and a tensor's per-call BlockMask, against the oracle;
    unmasked calls too."""
    for name, ends, Lk in _masks()[:masks]:
        q, k, v = make_qkv(2, 2, len(ends), Lk, 16, torch.float32, layout, seed=5)
        mask = att.BlockCausalMask(ends, Lk)
        want, _ = oracle(q, k, v, ends, 0.25, layout)
        with att.use_attention_backend("flex"):
            assert att.attention_backend("cpu", masked=True) == "flex"
            assert_close(f"flex {name} mask", bhld(att.attend(q, k, v, mask, 0.25, layout), layout), want, 2e-5)
            assert mask.block_mask("cpu") is mask.block_mask("cpu")
            assert_close(f"flex {name} tensor", bhld(att.attend(q, k, v, ends, 0.25, layout), layout), want, 2e-5)
    full, _ = oracle(q, k, v, torch.full((q.shape[2 if layout == "bhld" else 1],), Lk), 0.25, layout)
    with att.use_attention_backend("flex"):
        assert_close("flex unmasked", bhld(att.attend(q, k, v, scale=0.25, layout=layout), layout), full, 2e-5)


def test_backend_choice():
    """Defaults by device, capability and dtype; forced backends; errors."""
    choose = att.attention_backend
    kernel = "kernel" if varcore.ops.extension.LIBRARY is not None else "sdpa"
    assert choose("cpu", True) == kernel and choose("cpu", False) == "sdpa"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert choose("cuda", True, dtype, (9, 0)) == "flex"  # never the own kernel's portable path by default
        assert choose("cuda", True, dtype, (7, 5)) == "sdpa"
    assert choose("cuda", True, torch.float64, (9, 0)) == "sdpa"
    assert choose("cuda", False, torch.float32, (9, 0)) == "sdpa"
    flash = "flash_attn" if att._flash_attn_importable() else "sdpa"
    assert choose("cuda", False, torch.bfloat16, (9, 0)) == flash
    assert choose("cuda", False, torch.bfloat16, (7, 5)) == "sdpa"
    with att.use_attention_backend("sdpa"):
        assert choose("cpu", True) == "sdpa" and choose("cuda", True, torch.bfloat16, (9, 0)) == "sdpa"
        with att.use_attention_backend("flex"):
            assert choose("cpu", True) == "flex"
        assert choose("cpu", True) == "sdpa"
    assert choose("cpu", True) == kernel
    with pytest.raises(ValueError, match="must be one of"):
        with att.use_attention_backend("triton"):
            pass
    if not att._flash_attn_importable():
        with pytest.raises(ValueError, match=r"varcore\[flash\]"):
            with att.use_attention_backend("flash_attn"):
                pass
    if varcore.ops.extension.LIBRARY is not None:
        q, k, v = make_qkv(1, 1, 4, 4, 8, torch.float64, "bhld", seed=0)
        with att.use_attention_backend("kernel"):  # the CPU kernel covers float64
            assert_close("kernel float64 unmasked", att.attend(q, k, v, scale=0.5),
                         oracle(q, k, v, torch.full((4,), 4), 0.5)[0], 1e-10)
