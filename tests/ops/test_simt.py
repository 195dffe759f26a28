"""Host emulation of CUDA (csrc/simt/): the self-test kernels of csrc/simt/selftest_kernels.cu against PyTorch,
the bugs the emulator must catch (a missing barrier, a barrier in divergent code, bad launch configurations), and
that the emulated op families (torch.ops.varcore_simt) have the schemas of the real ones (torch.ops.varcore).

The kernels run through the extension ``varcore._simt``. Without it the tests skip, unless
``VARCORE_REQUIRE_SIMT=1`` (as in CI), which turns the missing extension into a failure.
"""
import os
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import require_compiled, require_simt

pytestmark = pytest.mark.simt

INT_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def ops():
    require_simt()  # registers torch.ops.varcore_simt, or skips (fails when VARCORE_REQUIRE_SIMT=1)
    return torch.ops.varcore_simt


def _ints(n, seed, low=-100, high=100):
    """Integer-valued floats: sums and scans of them are exact, so results compare exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).float()


def _per_block(x, threads):
    """x zero-padded to whole blocks, one row per block."""
    blocks = -(-x.numel() // threads)
    return torch.nn.functional.pad(x, (0, blocks * threads - x.numel())).view(blocks, threads)


# ---- reductions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 7, 32, 100, 256, 1024])
@pytest.mark.parametrize("n", [1, 255, 1000, 4097])
def test_block_sum(ops, threads, n):
    x = _ints(n, seed=n + threads)
    torch.testing.assert_close(ops.selftest_block_sum(x, threads), _per_block(x, threads).sum(1), rtol=0, atol=0)


@pytest.mark.parametrize("threads,active", [(64, 1), (64, 33), (256, 100), (1024, 1000)])
def test_barrier_does_not_wait_for_returned_threads(ops, threads, active):
    x = _ints(3000, seed=active)
    expected = _per_block(x, threads)[:, :active].sum(1)
    assert torch.equal(ops.selftest_block_sum_early_exit(x, threads, active), expected)


@pytest.mark.parametrize("threads", [1, 31, 32, 33, 64, 100, 256, 1000, 1024])
@pytest.mark.parametrize("n", [1, 33, 1000, 3001])
def test_warp_sum(ops, threads, n):
    x = _ints(n, seed=2 * n + threads)
    torch.testing.assert_close(ops.selftest_warp_sum(x, threads), _per_block(x, threads).sum(1), rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_reductions_of_random_floats(ops, seed):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(seed))
    expected = _per_block(x.double(), 256).sum(1).float()
    torch.testing.assert_close(ops.selftest_block_sum(x, 256), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ops.selftest_warp_sum(x, 256), expected, rtol=1e-5, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3000), threads=st.integers(1, 1024), seed=st.integers(0, 2**31))
def test_reductions_property(ops, n, threads, seed):
    x = _ints(n, seed)
    expected = _per_block(x, threads).sum(1)
    assert torch.equal(ops.selftest_block_sum(x, threads), expected)
    assert torch.equal(ops.selftest_warp_sum(x, threads), expected)


@pytest.mark.parametrize("threads", [64, 256, 1000])
def test_missing_barrier_gives_wrong_sums(ops, threads):
    # Positive values in whole blocks: the racy tree adds only log2(threads) + 1 of each block's values (thread 0
    # runs its whole loop before the others add anything), so every block sum comes out too small.
    x = _ints(threads * 5, seed=threads, low=1, high=100)
    expected = _per_block(x, threads).sum(1)
    assert torch.equal(ops.selftest_block_sum(x, threads), expected)
    racy = ops.selftest_block_sum_racy(x, threads)
    assert (racy < expected).all(), (racy, expected)


# ---- warp shuffles and votes --------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("threads,n", [(32, 1), (32, 100), (96, 1000), (256, 777)])
def test_warp_scan(ops, width, threads, n):
    x = _ints(n, seed=n * width)
    scan, totals = ops.selftest_warp_scan(x, threads, width)
    segments = _per_block(x, threads).reshape(-1, width)
    assert torch.equal(scan, segments.cumsum(1).flatten()[:n])
    assert torch.equal(totals, segments.sum(1, keepdim=True).expand(-1, width).flatten()[:n])


def _shuffle_sources(lane, arg, width):
    """Source lanes of __shfl_sync, _up, _down and _xor as PTX shfl.sync defines them (own lane when out of range)."""
    b = arg & 31
    first = lane & ~(width - 1)
    last = first + width - 1
    return [
        first | (b & (width - 1)),
        lane - b if lane - b >= first else lane,
        lane + b if lane + b <= last else lane,
        lane ^ b if lane ^ b <= last else lane,
    ]


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("arg", [0, 1, 3, 8, 17, 31, 32, -1])
def test_shuffle_modes(ops, arg, width):
    out = ops.selftest_shuffle_modes(arg, width)
    expected = [_shuffle_sources(lane, arg, width) + [lane ^ 1] for lane in range(32)]
    assert out.tolist() == expected


def test_shuffle_from_a_returned_lane_is_poison(ops):
    out = ops.selftest_shuffle_modes(1, 32, 7)
    assert out[7].tolist() == [-(2**31)] * 5  # lane 7 wrote nothing
    assert out[6, 2].item() == -1  # __shfl_down_sync(.., 1) of lane 6 reads lane 7
    assert out[8, 1].item() == -1  # __shfl_up_sync(.., 1) of lane 8 reads lane 7
    assert out[6, 4].item() == -1  # the half-warp butterfly pairs 6 with 7
    assert out[5, 2].item() == 6 and out[9, 1].item() == 8


def _expected_votes(pred, threads):
    padded = _per_block(pred.to(torch.int64), threads)  # past the end: False
    ballots, any_all = [], []
    for block in padded:
        for start in range(0, threads, 32):
            lanes = block[start : start + 32]
            ballots.append(sum(int(v) << lane for lane, v in enumerate(lanes.tolist())))
            any_all.append([int(lanes.any()), int(lanes.all())])
    block_votes = torch.stack([padded.sum(1), padded.all(1).long(), padded.any(1).long()], 1)
    return torch.tensor(ballots), torch.tensor(any_all, dtype=torch.int32), block_votes.int()


@pytest.mark.parametrize("p", [0.0, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("threads,n", [(32, 32), (48, 100), (100, 100), (256, 1000), (1024, 1024)])
def test_ballot_any_all(ops, p, threads, n):
    pred = torch.rand(n, generator=torch.Generator().manual_seed(n)) < p
    ballots, any_all, block_votes = ops.selftest_ballot(pred, threads)
    exp_ballots, exp_any_all, exp_block = _expected_votes(pred, threads)
    assert torch.equal(ballots, exp_ballots)
    assert torch.equal(any_all, exp_any_all)
    assert torch.equal(block_votes, exp_block)


# ---- atomics --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [1, 7, 100, 1000])
@pytest.mark.parametrize("n,blocks", [(1, 1), (1000, 8), (50000, 8), (30000, 1)])
def test_histogram(ops, bins, n, blocks):
    g = torch.Generator().manual_seed(bins + n)
    x = torch.randint(-1, bins + 1, (n,), generator=g, dtype=torch.int32)  # -1 and bins are skipped
    counts, first, last, weight_sum, weight_max = ops.selftest_histogram(x, bins, 256, blocks)
    i = torch.arange(n)
    keep = (x >= 0) & (x < bins)
    b, i = x[keep].long(), i[keep]
    assert torch.equal(counts, torch.bincount(b, minlength=bins))
    exp_first = torch.full((bins,), INT_MAX).scatter_reduce(0, b, i, "amin").int()
    exp_last = torch.full((bins,), -1).scatter_reduce(0, b, i, "amax").int()
    assert torch.equal(first, exp_first)
    assert torch.equal(last, exp_last)
    assert torch.equal(weight_sum, torch.zeros(bins).index_add(0, b, (i % 7).float()))
    w = ((37 * i) % 101).float() * 0.25
    assert torch.equal(weight_max, torch.full((bins,), float("-inf")).scatter_reduce(0, b, w, "amax"))


def _signed64(v):
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


@pytest.mark.parametrize("n,threads", [(1, 32), (33, 32), (1000, 256), (4096, 1024)])
def test_atomics(ops, n, threads):
    ints, uints, ulls, lls, doubles, floats, tickets, exchanged = ops.selftest_atomics(n, threads)
    i = list(range(n))
    assert ints[0].item() == n
    assert sorted(tickets.tolist()) == i
    assert ints[1].item() == -sum(i)
    assert sorted(exchanged.tolist() + [ints[2].item()]) == sorted([-1] + i)
    assert ints[3].item() == min(3 * k - 1000 for k in i)
    assert ints[4].item() == max((k % 1009) * 7919 % 1009 for k in i)

    def fold(op, values, start):
        acc = start
        for v in values:
            acc = op(acc, v)
        return acc

    m32 = 0xFFFFFFFF
    assert uints[0].item() == fold(lambda a, v: a | v, [1 << (k % 32) for k in i], 0)
    assert uints[1].item() == fold(lambda a, v: a & v, [~(1 << (k % 29)) & m32 for k in i], m32)
    assert uints[2].item() == fold(lambda a, v: a ^ v, [(k * 2654435761) & m32 for k in i], 0)
    assert uints[3].item() == n % 17
    assert uints[4].item() == (-n) % 17
    assert uints[5].item() == max(((k * 40503) & m32) % 65521 for k in i)
    assert uints[6].item() == min(((k * 40503) & m32) % 65521 + 7 for k in i)
    assert ulls.tolist() == [
        _signed64(sum(k * 1000000007 for k in i)),
        max(k * k for k in i),
        min(k * k + 5 for k in i),
        3 * n,
        42,
        _signed64(fold(lambda a, v: a | v, [1 << (k % 64) for k in i], 0)),
    ]
    assert lls.tolist() == [max((k - n // 2) * 3 for k in i), min((k - n // 2) * 3 for k in i)]
    assert doubles[0].item() == sum(k * 0.5 for k in i)
    # atomicExch(float): the values handed back plus the one left behind are the initial -1 and every i
    assert doubles[1].item() + floats[0].item() == -1 + sum(i)


# ---- shared memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 33), (33, 1), (31, 33), (64, 64), (100, 37), (65, 130)])
def test_transpose(ops, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * 1000 + shape[1]))
    assert torch.equal(ops.selftest_transpose(x), x.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads,n", [(1, 5), (5, 23), (64, 64), (257, 1000), (1024, 3000)])
def test_dynamic_shared_memory(ops, dtype, threads, n):
    x = _ints(n, seed=threads + n).to(dtype)
    expected = _per_block(x, threads).cumsum(1).flatten()[:n]
    assert torch.equal(ops.selftest_dynamic_smem(x, threads), expected)


def test_dynamic_shared_memory_above_48k_needs_opt_in(ops):
    x = _ints(300, seed=3)
    expected = _per_block(x, 128).cumsum(1).flatten()[:300]
    # block_scan opts in with cudaFuncSetAttribute, as a GPU requires above 48 KiB
    assert torch.equal(ops.selftest_dynamic_smem(x, 128, 100_000), expected)
    with pytest.raises(RuntimeError, match="cudaFuncSetAttribute.*failed.*invalid argument"):  # over 227 KiB
        ops.selftest_dynamic_smem(x, 128, 300_000)
    # the failed call's error is consumed: the next launch is fine
    assert torch.equal(ops.selftest_dynamic_smem(x, 128), expected)


# ---- 16-bit floats ------------------------------------------------------------------------------------------


def _same_floats(a, b):
    """Bitwise equal, except that any NaN equals any NaN (CUDA and PyTorch use different NaN payloads)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.masked_fill(a.isnan(), 0).view(torch.int32), b.masked_fill(b.isnan(), 0).view(torch.int32)
    )


def test_half_and_bfloat16_conversions(ops):
    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, -1e6, float("inf"), float("-inf"),
               float("nan"), 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 3 * 2.0**-26, 6.1e-5, 1.0 + 2.0**-11,
               1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.3895314e38, 1e-40]
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    scaled = torch.randn(20000, generator=g) * torch.logspace(-8, 5, 20000)
    x = torch.cat([torch.tensor(special), bits.view(torch.float32), scaled])
    half_out, bf16_out, arith_out = ops.selftest_half(x)
    assert _same_floats(half_out, x.half().float())
    assert _same_floats(bf16_out, x.bfloat16().float())
    h = x.half()
    assert _same_floats(arith_out, (h * torch.tensor(0.75, dtype=torch.half) + h).float())


# ---- math intrinsics -----------------------------------------------------------------------------------------


def _saturated(v):
    return torch.where(v.isnan(), 0, v.clamp(-(2**31), INT_MAX)).to(torch.int64).int()


def _unsigned_bits(x):
    return [b & 0xFFFFFFFF for b in x.view(torch.int32).tolist()]


def _to_int32(values):
    return torch.tensor(values, dtype=torch.int64).to(torch.int32)  # wraps like a C cast


def test_math_intrinsics(ops):
    special = [0.0, -0.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.7, -3.7, 1e-3, 2.0**31, -(2.0**31), 2.0**31 - 128,
               3e9, -3e9, float("inf"), float("-inf"), float("nan"), 100.0, -100.0, 1e-40]
    x = torch.cat([torch.tensor(special), torch.randn(500, generator=torch.Generator().manual_seed(5)) * 10])
    f, k = ops.selftest_math(x)
    a = x.abs()
    expected_f = torch.stack(
        [x.exp(), (a + 1).log(), (a + 1).rsqrt(), x / 3, torch.fmax(x, torch.tensor(0.5)),
         torch.fmin(x, torch.tensor(-0.5)), torch.where(x.isnan(), 0, x.clamp(0, 1)), x.sin(), x.cos(), a.pow(1.5),
         x * 2 + 1, x],
        1,
    )
    torch.testing.assert_close(f, expected_f, rtol=2e-6, atol=1e-6, equal_nan=True)
    v = x.double()
    u = _unsigned_bits(x)
    expected_k = torch.stack(
        [
            _saturated(v.round()),  # halves to even
            _saturated(v.trunc()),
            _saturated(v.floor()),
            _saturated(v.ceil()),
            x.view(torch.int32),
            torch.tensor([bin(b).count("1") for b in u], dtype=torch.int32),
            torch.tensor([32 - b.bit_length() for b in u], dtype=torch.int32),
            torch.tensor([(b & -b).bit_length() for b in u], dtype=torch.int32),
            _to_int32([int(f"{b:032b}"[::-1], 2) for b in u]),
            x.view(torch.int32).clamp(max=12345),
            x.view(torch.int32).clamp(min=-12345),
        ],
        1,
    )
    assert torch.equal(k, expected_k)


# ---- errors the emulator must report -------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [32, 64, 256])
def test_divergent_barrier_is_a_deadlock(ops, threads):
    with pytest.raises(RuntimeError, match=r"deadlock.*__syncthreads.*__shfl_xor_sync"):
        ops.selftest_divergent_barrier(_ints(1000, seed=0), threads)
    # the emulator is usable again after the failed launch
    x = _ints(1000, seed=1)
    assert torch.equal(ops.selftest_block_sum(x, threads), _per_block(x, threads).sum(1))


@pytest.mark.parametrize(
    "mode,match",
    [
        (0, "__shfl_sync: mask 0xfffffffe does not include the calling lane 0"),
        (1, "width 3 is not a power of 2"),
        (2, r"deadlock.*__shfl_xor_sync.*__ballot_sync"),
    ],
)
def test_warp_misuse(ops, mode, match):
    with pytest.raises(RuntimeError, match=match):
        ops.selftest_warp_misuse(mode)


@pytest.mark.parametrize(
    "config,match",
    [
        ((1, 1, 1, 1025, 1, 1), r"blockDim \(1025, 1, 1\) has 1025 threads"),
        ((1, 1, 1, 32, 32, 2), "has 2048 threads"),
        ((1, 1, 1, 1, 1, 65), "blockDim.z = 65 exceeds the limit of 64"),
        ((0, 1, 1, 1, 1, 1), "gridDim.x is 0"),
        ((1, 1, 0, 1, 1, 1), "gridDim.z is 0"),
        ((1, 1, 1, 1, 0, 1), "blockDim.y is 0"),
        ((1, 65536, 1, 1, 1, 1), "gridDim.y = 65536 exceeds the limit of 65535"),
        ((1, 1, 65536, 1, 1, 1), "gridDim.z = 65536"),
        ((2**31, 1, 1, 1, 1, 1), "gridDim.x = 2147483648 exceeds the limit of 2147483647"),
    ],
)
def test_bad_launch_configuration(ops, config, match):
    with pytest.raises(RuntimeError, match=match):
        ops.selftest_launch(*config)


def test_dynamic_shared_memory_limits(ops):
    with pytest.raises(RuntimeError, match="65536 bytes exceeds this kernel's limit of 49152 bytes"):
        ops.selftest_launch(1, 1, 1, 32, 1, 1, 64 * 1024)
    with pytest.raises(RuntimeError, match="per-block maximum of 232448 bytes"):
        ops.selftest_launch(1, 1, 1, 32, 1, 1, 300 * 1024, True)
    assert ops.selftest_launch(2, 1, 1, 32, 1, 1, 100 * 1024, True).item() == 64


@pytest.mark.parametrize(
    "config", [(1, 1, 1, 1, 1, 1), (3, 2, 2, 4, 3, 2), (1, 1, 1, 1024, 1, 1), (1, 1, 1, 1, 1, 64), (5, 1, 1, 33, 1, 1)]
)
def test_good_launch_configuration_runs_every_thread(ops, config):
    gx, gy, gz, bx, by, bz = config
    assert ops.selftest_launch(*config, 1000).item() == gx * gy * gz * bx * by * bz


def test_input_checks(ops):
    with pytest.raises(RuntimeError, match="x must be Float"):
        ops.selftest_block_sum(torch.zeros(10, dtype=torch.float64), 32)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ops.selftest_transpose(torch.zeros(8, 6).t())
    with pytest.raises(RuntimeError, match=r"threads must be in \[1, 1024\]"):
        ops.selftest_warp_sum(torch.zeros(10), 2000)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.selftest_warp_scan(torch.zeros(10), 48, 4)
    with pytest.raises(RuntimeError, match="gx must be in"):
        ops.selftest_launch(-1, 1, 1, 1, 1, 1)


# ---- host threads ----------------------------------------------------------------------------------------------


def test_concurrent_launches_from_two_threads(ops):
    # Both threads run the same kernels (the same static shared memory) at the same time; the op releases the GIL.
    inputs = [_ints(256 * 40 + 17, seed=s) for s in (1, 2)]
    expected = [_per_block(x, 256).sum(1) for x in inputs]
    failures = []

    def work(x, want):
        try:
            for _ in range(5):
                if not torch.equal(ops.selftest_block_sum(x, 256), want):
                    failures.append("block_sum")
                if not torch.equal(ops.selftest_warp_sum(x, 256), want):
                    failures.append("warp_sum")
        except Exception as exc:  # noqa: BLE001  (reported below)
            failures.append(repr(exc))

    workers = [threading.Thread(target=work, args=pair) for pair in zip(inputs, expected)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures


@pytest.mark.parametrize(
    "kib,expected",
    [("32", "tensor([4.])"), ("8", "VARCORE_SIMT_STACK_KB must be a whole number of KiB in [16, 65536], got '8'")],
)
def test_stack_size_variable(ops, kib, expected):
    import varcore

    code = (
        "import torch, varcore._simt\n"
        "try:\n"
        "    print(torch.ops.varcore_simt.selftest_block_sum(torch.ones(4), 4))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    package_parent = os.path.dirname(os.path.dirname(varcore.__file__))
    path = os.pathsep.join(p for p in [package_parent, os.environ.get("PYTHONPATH", "")] if p)
    env = dict(os.environ, VARCORE_SIMT_STACK_KB=kib, PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert expected in out.stdout, out


# ---- the emulated op families ----------------------------------------------------------------------------------

# Ops without a CUDA kernel, and so without an emulated one.
CPU_ONLY_OPS = {"decode_linear_pack", "decode_linear", "decode_linear_rmsnorm"}


def _schemas(namespace):
    """Every op of torch.ops.<namespace> (with its overload name) -> its schema without the namespace."""
    prefix = namespace + "::"
    return {s.name[len(prefix):] + (f".{s.overload_name}" if s.overload_name else ""): str(s)[len(prefix):]
            for s in torch._C._jit_get_all_schemas() if s.name.startswith(prefix)}


def test_emulated_schemas_are_the_real_ones(ops):
    library = require_compiled()
    real = _schemas("varcore")
    emulated = {name: s for name, s in _schemas("varcore_simt").items() if not name.startswith("selftest_")}
    assert emulated == {name: s for name, s in real.items() if name not in CPU_ONLY_OPS}
    if library.WITH_CUDA:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key
        assert {name for name in real if has_cuda(f"varcore::{name}", "CUDA")} == set(emulated)


# ---- tensor-core fragments ---------------------------------------------------------------------------------
# The register layout of PTX mma.m16n8k16 that the WMMA emulation documents (csrc/simt/simt_wmma.h), written
# out independently: (row, column) of element i of lane l, with g = l // 4 and t = l % 4.
def _layout_a(lane, i):
    g, t = divmod(lane, 4)
    return g + 8 * (i // 2 % 2), 2 * t + i % 2 + 8 * (i // 4)


def _layout_b(lane, i):
    g, t = divmod(lane, 4)
    j = i % 4
    return 2 * t + j % 2 + 8 * (j // 2), 8 * (i // 4) + g


def _layout_acc(lane, i):
    g, t = divmod(lane, 4)
    j = i % 4
    return g + 8 * (j // 2), 8 * (i // 4) + 2 * t + j % 2


def _fragment(tile, layout):
    return torch.tensor([[tile[layout(lane, i)].item() for i in range(8)] for lane in range(32)])


def _in_memory(tile, col_major, ld, offset=0):
    """A 16x16 tile in a 1-D buffer: element (r, c) at offset + r * ld + c (row-major) or + c * ld + r."""
    mem = torch.full((offset + 16 * ld,), float("nan"), dtype=tile.dtype)
    view = mem[offset:offset + 16 * ld].view(16, ld)[:, :16]
    view.copy_(tile.t() if col_major else tile)
    return mem


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("a_col,b_col", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("ld", [16, 24])
def test_wmma_fragments(ops, dtype, a_col, b_col, ld):
    """d = a b + c through common/mma.h's WMMA branch, every layout pair; the fragments hold the documented
    elements. Inputs are small integers, so every product and sum is exact and d must equal a b + c exactly."""
    g = torch.Generator().manual_seed(ld + 2 * a_col + b_col)
    a, b = (torch.randint(-8, 8, (16, 16), generator=g).to(dtype) for _ in range(2))
    c = torch.randint(-64, 64, (16, 16), generator=g).float()
    d, frag_a, frag_b, frag_c = ops.selftest_wmma(_in_memory(a, a_col, ld), _in_memory(b, b_col, ld), c, a_col,
                                                  b_col, ld)
    torch.testing.assert_close(d, a.float() @ b.float() + c, rtol=0, atol=0)
    assert torch.equal(frag_a, _fragment(a.float(), _layout_a)), "matrix_a fragment layout"
    assert torch.equal(frag_b, _fragment(b.float(), _layout_b)), "matrix_b fragment layout"
    assert torch.equal(frag_c, _fragment(c, _layout_acc)), "accumulator fragment layout"


def test_wmma_fragments_of_random_values(ops):
    """Random bfloat16 tiles: float accumulation of exact products, to float rounding."""
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randn(16, 16, generator=g).bfloat16() for _ in range(2))
    c = torch.randn(16, 16, generator=g)
    d = ops.selftest_wmma(_in_memory(a, False, 16), _in_memory(b, True, 16), c, False, True, 16)[0]
    torch.testing.assert_close(d, a.double() @ b.double() + c.double(), rtol=1e-6, atol=1e-5, check_dtype=False)


def test_wmma_rules(ops):
    """As on a GPU: 32-byte aligned pointers and ldm a multiple of 16 bytes, else the launch fails."""
    a = torch.zeros(16, 16, dtype=torch.float16)
    c = torch.zeros(16, 16)
    with pytest.raises(RuntimeError, match="32-byte aligned"):
        ops.selftest_wmma(_in_memory(a, False, 16, offset=8), _in_memory(a, False, 16), c, False, False, 16, 8)
    with pytest.raises(RuntimeError, match="multiple of 8 elements"):
        ops.selftest_wmma(_in_memory(a, False, 20), _in_memory(a, False, 20), c, False, False, 20)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.selftest_wmma(torch.zeros(256), torch.zeros(256), c, False, False, 16)
    # an aligned offset is fine: 16 half elements are 32 bytes
    d = ops.selftest_wmma(_in_memory(a, False, 16, offset=16), _in_memory(a, False, 16), c, False, False, 16, 16)[0]
    assert torch.equal(d, c)
