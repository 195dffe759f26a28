"""Every compiled op with a zero and with a one in every dimension of its arguments.

Each op is described by named sizes (the batch, the channels, the keys, ...), and its arguments are built from
them, so that a size shared by several tensors changes in all of them at once (K = 0 in both ``x`` and the packed
weight of ``decode_linear``). For every size set to 0 and to 1 the CPU kernel and the emulated CUDA kernel must
either return the reference's result or refuse the input with an ordinary exception, as the reference does: a
kernel that divides by a zero count dies with SIGFPE and takes the test run with it.
"""
import pytest
import torch

from varcore.ops import attention as att, linear as lin, par_order as po, quant as q

from backends import require_compiled, require_simt

KERNEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 7 * len(shape)))


def _randint(high, *shape):
    return torch.randint(0, max(high, 1), shape, generator=torch.Generator().manual_seed(3))


# name -> (sizes, build(sizes) -> args, reference(*args) -> result or raises, ops that have an emulated kernel)
def _ops_table():
    def par_gather(s):
        return (_randn(s["B"], s["G"], s["G"], s["C"]), s["M"])

    def par_scatter(s):
        return (_randn(s["B"], s["G"] * s["G"], s["C"]), s["M"])

    def par_group_scatter(s):
        return (_randn(s["B"], s["G"], s["G"], s["C"]), _randn(s["B"], s["M"] * s["M"], s["C"]), 0, s["M"])

    def attention(s):
        q = _randn(s["B"], s["H"], s["Lq"], s["D"])
        k, v = _randn(s["B"], s["H"], s["Lk"], s["D"]), _randn(s["B"], s["H"], s["Lk"], s["D"])
        ends = torch.full((s["Lq"],), s["Lk"], dtype=torch.int32)
        return (q, k, v, ends, 0.5, "bhld")

    def nearest(s):
        return (_randn(s["N"], s["C"]), _randn(s["V"], s["C"]), False)

    def upsample(s):
        pns = [1, s["P"]]
        return (_randint(s["V"], s["B"], 1 + s["P"] ** 2), _randn(s["V"], s["C"]), pns, [0, 0])

    def encode(s):
        C = s["C"]
        return (_randn(s["B"], C, s["P"], s["P"]), _randn(s["V"], C), [_randn(C, C, 3, 3)], [_randn(C)], [0, 0],
                0.5, [1, s["P"]], False, True)

    def add_scale(s):
        C = s["C"]
        return (_randn(s["B"], C, s["P"], s["P"]), _randint(s["V"], s["B"], 1), _randn(s["V"], C),
                _randn(C, C, 3, 3), _randn(C), 0.5, s["P"], True, False)

    def pack(s):
        return (_randn(s["N"], s["K"]),)

    def linear(s):
        return (_randn(s["R"], s["K"]), lin.decode_linear_pack_ref(_randn(s["N"], s["K"])), s["N"])

    def linear_rms(s):
        return (*linear(s), _randn(s["K"]).abs() + 0.5, 1e-6)

    return {
        "par_gather": (dict(B=2, G=4, C=3, M=2), par_gather, po.par_gather_ref, True),
        "par_scatter": (dict(B=2, G=4, C=3, M=2), par_scatter, po.par_scatter_ref, True),
        "par_group_scatter_": (dict(B=2, G=4, C=3, M=2), par_group_scatter,
                               lambda c, t, g, M: po.par_group_scatter_ref_(c.clone(), t, g, M), True),
        "block_causal_attention": (dict(B=1, H=2, Lq=3, Lk=5, D=8), attention,
                                   lambda *a: att.block_causal_attention_ref(*a)[0], True),
        "nearest_code": (dict(N=7, V=5, C=4), nearest, q.nearest_code_ref, True),
        "upsample_sum": (dict(B=2, V=5, C=4, P=2), upsample, None, True),
        "msrq_encode": (dict(B=2, V=5, C=4, P=2), encode, None, True),
        "add_scale_": (dict(B=2, V=5, C=4, P=2), add_scale, None, True),
        "decode_linear_pack": (dict(N=6, K=5), pack, lin.decode_linear_pack_ref, False),
        "decode_linear": (dict(R=2, N=6, K=5), linear, lin.decode_linear_ref, False),
        "decode_linear_rmsnorm": (dict(R=2, N=6, K=5), linear_rms, lin.decode_linear_rmsnorm_ref, False),
    }


OPS = _ops_table()


def _cases():
    for name, (sizes, _, _, emulated) in OPS.items():
        for dim in sizes:
            for value in (0, 1):
                for backend in ("cpu", "simt") if emulated else ("cpu",):
                    marks = [pytest.mark.simt] if backend == "simt" else []
                    yield pytest.param(name, dim, value, backend, marks=marks, id=f"{backend}-{name}-{dim}={value}")


def _first(result):
    return result[0] if isinstance(result, (tuple, list)) else result


@pytest.mark.parametrize("name,dim,value,backend", list(_cases()))
def test_degenerate_size(name, dim, value, backend):
    require_compiled()
    ops = torch.ops.varcore
    if backend == "simt":
        require_simt()
        ops = torch.ops.varcore_simt
    sizes, build, ref, _ = OPS[name]
    args = build({**sizes, dim: value})
    try:
        got = getattr(ops, name)(*args)
    except KERNEL_ERRORS as e:
        assert str(e).strip(), "a refusal must say why"
        if ref is not None:  # a refusal is right only where the result is not defined
            try:
                want = ref(*build({**sizes, dim: value}))
            except (ValueError, TypeError, RuntimeError, IndexError):
                return
            if _first(want).numel():
                raise AssertionError(f"{name} refused {dim}={value} ({e}) where the reference returns a result")
        return
    if name == "par_group_scatter_":
        got = args[0]
    if ref is None:
        return  # the quantiser pipelines: values checked in test_quant; here, no crash and a clean refusal
    want = ref(*build({**sizes, dim: value}))
    got, want = _first(got), _first(want)
    assert got.shape == want.shape, f"{name} {dim}={value}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
