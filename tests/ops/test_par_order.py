"""PAR token order ops: every backend against an independent loop implementation of the spec's formula,
round-trip properties, the golden tokens of the official PAR code, bad input, opcheck, autograd, compile."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import varcore
from varcore.ops import par_order as po

from backends import backend_params, require_compiled, resolve
from conftest import load_expected

NAMES = {
    "gather": (po.par_gather_ref, "par_gather"),
    "scatter": (po.par_scatter_ref, "par_scatter"),
    "group_scatter_": (po.par_group_scatter_ref_, "par_group_scatter_"),
}

DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.float32, torch.float16,
          torch.bfloat16, torch.float64, torch.complex64]


def spec_order(G, M):
    """List of raster (r, c) in PAR order, written straight from the spec: n = ((b*R + d)*M + a)*M + e."""
    R = G // M
    order = [None] * (G * G)
    for a in range(M):
        for b in range(R):
            for e in range(M):
                for d in range(R):
                    order[((b * R + d) * M + a) * M + e] = (a * R + b, e * R + d)
    return order


def random_payload(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(*shape, 2, generator=g).to(torch.float32).view(torch.complex64).squeeze(-1)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    hi = 256 if dtype == torch.uint8 else 30000
    return torch.randint(0, hi, shape, generator=g).to(dtype)


def test_spec_example_4x_24():
    # spec B.2: 4x on 24x24 starts (0,0), (0,12), (12,0), (12,12), (0,1), (0,13), (12,1), (12,13)
    perm = po.par_permutation(24, 2)
    first = [divmod(int(i), 24) for i in perm[:8]]
    assert first == [(0, 0), (0, 12), (12, 0), (12, 12), (0, 1), (0, 13), (12, 1), (12, 13)]


@pytest.mark.parametrize("G,M", [(1, 1), (4, 2), (6, 3), (8, 4), (12, 2), (16, 4), (24, 2), (24, 4), (5, 5)])
def test_permutation_matches_spec(G, M):
    expected = [r * G + c for r, c in spec_order(G, M)]
    assert po.par_permutation(G, M).tolist() == expected


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("G,M,B", [(4, 2, 1), (6, 3, 2), (8, 2, 3), (12, 4, 2), (24, 2, 2), (24, 4, 1), (5, 1, 2)])
@pytest.mark.parametrize("C", [None, 1, 3, 8])
def test_gather_scatter_against_spec(backend, G, M, B, C):
    ops = resolve(backend, NAMES)
    shape = (B, G, G) if C is None else (B, G, G, C)
    x = random_payload(shape, torch.float32, seed=G * 100 + M * 10 + B).to(ops.device)
    y = ops.gather(x, M)
    order = spec_order(G, M)
    expected = torch.stack([x[:, r, c] for r, c in order], dim=1)
    assert torch.equal(y, expected)
    assert torch.equal(ops.scatter(y, M), x)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_round_trip(backend, dtype):
    ops = resolve(backend, NAMES)
    for C in (None, 3):
        shape = (2, 8, 8) if C is None else (2, 8, 8, C)
        x = random_payload(shape, dtype, seed=7).to(ops.device)
        y = ops.gather(x, 2)
        assert y.dtype == dtype
        assert torch.equal(y, po.par_gather_ref(x.cpu(), 2).to(ops.device))
        assert torch.equal(ops.scatter(y, 2), x)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_and_misaligned_inputs(backend):
    ops = resolve(backend, NAMES)
    base = random_payload((3, 12, 12, 5), torch.float32, seed=3).to(ops.device)
    transposed = base.transpose(1, 2)  # strided grid
    sliced = base[..., 1:4]  # storage offset of 4 bytes: 12-byte tokens, not 8-byte aligned
    for x in (transposed, sliced, base[:, :, :, 2]):
        assert torch.equal(ops.gather(x, 2), po.par_gather_ref(x.contiguous(), 2))
        assert torch.equal(ops.gather(x, 3), po.par_gather_ref(x.contiguous(), 3))
    seq = po.par_gather_ref(base, 4).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous sequence
    assert torch.equal(ops.scatter(seq, 4), base)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("G,M,C", [(8, 2, None), (12, 3, 2), (24, 4, None), (6, 6, 4)])
def test_group_scatter_builds_the_canvas(backend, G, M, C):
    ops = resolve(backend, NAMES)
    B = 2
    shape = (B, G, G) if C is None else (B, G, G, C)
    x = random_payload(shape, torch.int64, seed=G + M).to(ops.device)
    seq = po.par_gather_ref(x.cpu(), M).to(ops.device)
    canvas = torch.full_like(x, -1)
    groups = list(range((G // M) ** 2))
    for g in groups[::-1]:  # any order: each step writes only its own group
        before = canvas.clone()
        ops.group_scatter_(canvas, seq[:, g * M * M:(g + 1) * M * M].contiguous(), g, M)
        changed = (canvas != before).reshape(B, -1, *([C] if C else [])).any(0)
        assert int(changed.reshape(G * G, -1).any(1).sum()) == M * M
    assert torch.equal(canvas, x)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(B=st.integers(0, 3), M=st.integers(1, 4), R=st.integers(1, 5), C=st.sampled_from([None, 1, 2, 7]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_round_trip(B, M, R, C, dtype, seed):
    G = M * R
    shape = (B, G, G) if C is None else (B, G, G, C)
    x = random_payload(shape, dtype, seed)
    y = varcore.ops.par_gather(x, M)
    assert torch.equal(y, x.flatten(1, 2)[:, po.par_permutation(G, M)])
    assert torch.equal(varcore.ops.par_scatter(y, M), x)
    canvas = torch.zeros_like(x)
    for g in range(R * R):
        varcore.ops.par_group_scatter_(canvas, y[:, g * M * M:(g + 1) * M * M], g, M)
    assert torch.equal(canvas, x)


@pytest.mark.parametrize("backend", backend_params())
def test_golden_par_small(backend, golden_dir):
    import json

    ops = resolve(backend, NAMES)
    folder = golden_dir / "par-small"
    M = json.loads((folder / "config.json").read_text())["M"]
    exp = load_expected(folder)
    raster, par = exp["codes_raster"].to(ops.device), exp["codes_par_order"].to(ops.device)
    assert torch.equal(ops.gather(raster, M), par)
    assert torch.equal(ops.scatter(par, M), raster)
    samples = [k[: -len("_par_order")] for k in exp if k.startswith("sample") and k.endswith("_par_order")]
    assert samples
    for s in samples:
        assert torch.equal(ops.scatter(exp[f"{s}_par_order"].to(ops.device), M), exp[f"{s}_raster"].to(ops.device))


# --------------------------------------------------------------------------------------------- bad input
BAD_CASES = [
    ("gather", lambda: (torch.zeros(2, 6, 6, dtype=torch.long), 4), ValueError, "multiple of M"),
    ("gather", lambda: (torch.zeros(2, 6, 5, dtype=torch.long), 2), ValueError, "square"),
    ("gather", lambda: (torch.zeros(6, 6, dtype=torch.long), 2), ValueError, "(B, G, G)"),
    ("gather", lambda: (torch.zeros(2, 4, 4), 0), ValueError, "M"),
    ("scatter", lambda: (torch.zeros(2, 15, dtype=torch.long), 1), ValueError, "square"),
    ("scatter", lambda: (torch.zeros(2, 36, dtype=torch.long), 4), ValueError, "multiple of M"),
    ("scatter", lambda: (torch.zeros(36), 2), ValueError, "(B, L)"),
    ("group_scatter_", lambda: (torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 16, 2),
     ValueError, "group"),
    ("group_scatter_", lambda: (torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), -1, 2),
     ValueError, "group"),
    ("group_scatter_", lambda: (torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(2, 4, dtype=torch.int32), 0, 2),
     TypeError, "dtype"),
    ("group_scatter_", lambda: (torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long), 0, 2),
     ValueError, "shape"),
    ("group_scatter_", lambda: (torch.zeros(2, 8, 8, 3), torch.zeros(2, 4, 2), 0, 2), ValueError, "shape"),
    ("group_scatter_", lambda: (torch.zeros(2, 8, 8).transpose(1, 2), torch.zeros(2, 4), 0, 2),
     ValueError, "contiguous"),
    ("group_scatter_", lambda: (torch.zeros(2, 9, 9), torch.zeros(2, 4), 0, 2), ValueError, "multiple of M"),
]


@pytest.mark.parametrize("backend", ["python", "reference", "cpu", "simt"])
@pytest.mark.parametrize("which,make,exc,msg", BAD_CASES)
def test_bad_input_is_rejected(backend, which, make, exc, msg):
    if backend == "python":
        fn = {"gather": varcore.ops.par_gather, "scatter": varcore.ops.par_scatter,
              "group_scatter_": varcore.ops.par_group_scatter_}[which]
    else:
        fn = getattr(resolve(backend, NAMES), which)
    args = make()
    snapshot = args[0].clone()
    with pytest.raises(exc, match=pytest.importorskip("re").escape(msg)):
        fn(*args)
    assert torch.equal(args[0], snapshot)  # nothing written before the check


def test_python_type_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        varcore.ops.par_gather([[1]], 1)
    with pytest.raises(TypeError, match="M"):
        varcore.ops.par_gather(torch.zeros(1, 4, 4), 2.0)
    with pytest.raises(TypeError, match="group"):
        varcore.ops.par_group_scatter_(torch.zeros(1, 4, 4), torch.zeros(1, 4), 1.0, 2)


def test_devices_must_match_meta():
    canvas = torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="canvas on"):
        varcore.ops.par_group_scatter_(canvas, torch.zeros(1, 4, device="meta"), 0, 2)


# --------------------------------------------------------------------------------------------- op machinery
def _opcheck_samples():
    return [
        ("par_gather", (torch.randn(2, 8, 8), 2)),
        ("par_gather", (torch.randint(0, 9, (3, 6, 6, 4)), 3)),
        ("par_scatter", (torch.randn(2, 64, 3), 4)),
        ("par_scatter", (torch.randint(0, 9, (1, 36)), 2)),
        ("par_group_scatter_", (torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), 5, 2)),
    ]


@pytest.mark.parametrize("op,args", _opcheck_samples())
def test_opcheck(op, args):
    require_compiled()
    torch.library.opcheck(getattr(torch.ops.varcore, op), args)


def test_opcheck_autograd():
    require_compiled()
    x = torch.randn(2, 8, 8, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.varcore.par_gather, (x, 2))
    torch.library.opcheck(torch.ops.varcore.par_scatter, (torch.randn(2, 36, dtype=torch.float64,
                                                                         requires_grad=True), 3))


def test_gradients():
    require_compiled()
    x = torch.randn(2, 6, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.varcore.par_gather(t, 3), (x,))
    s = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.varcore.par_scatter(t, 2), (s,))


def test_torch_compile_fullgraph():
    require_compiled()

    @torch.compile(fullgraph=True, backend="inductor")
    def reorder_and_back(x):
        y = varcore.ops.par_gather(x, 2) * 2
        return varcore.ops.par_scatter(y, 2)

    x = torch.randn(3, 8, 8)
    assert torch.equal(reorder_and_back(x), x * 2)


def test_backend_switch(monkeypatch):
    require_compiled()
    assert varcore.info(print_report=False)["ops"]["par_gather"]["cpu"] == "kernel"
    monkeypatch.setenv("VARCORE_BACKEND", "reference")
    assert varcore.info(print_report=False)["ops"]["par_gather"]["cpu"] == "reference"
    x = torch.randn(1, 4, 4)
    assert torch.equal(varcore.ops.par_gather(x, 2), po.par_gather_ref(x, 2))
