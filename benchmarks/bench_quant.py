"""VAR quantiser: fused kernels vs the reference composite (ms, peak memory, speed-up; GFLOP/s for nearest code).

    python benchmarks/bench_quant.py [--quick] [--device cpu|cuda] [--threads N] [--out FILE.json]

Shapes: the 256 px schedule (1, 2, ..., 16), V=4096 codes, Cvae=32, B in {1, 16, 64} ({1, 16} with --quick).
The references are the same public functions with VARCORE_BACKEND=reference (the official chain of small ops:
area interpolation, a dense N x V distance matrix, argmin, embedding, bicubic upsampling, one phi conv per scale).
nearest_code is measured on all B*680 token rows of a pyramid and on N=16384, and its GFLOP/s (2*N*V*C) is set
against this machine's fp32 GEMM throughput measured in the same run (a 2048^3 matmul, and the same-shape z @ e.T).
"""
import argparse
import contextlib
import os

import torch

from common import bench, machine_header, print_header, print_table, write_json

import varcore
from varcore.models.quant import VectorQuantizer2
from varcore.ops import quant as q

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
V, CVAE = 4096, 32


@contextlib.contextmanager
def reference_backend():
    old = os.environ.get("VARCORE_BACKEND")
    os.environ["VARCORE_BACKEND"] = "reference"
    try:
        yield
    finally:
        if old is None:
            del os.environ["VARCORE_BACKEND"]
        else:
            os.environ["VARCORE_BACKEND"] = old


def quantizer(device):
    torch.manual_seed(0)
    vq = VectorQuantizer2(V, CVAE, using_znorm=False, v_patch_nums=PATCH_NUMS, share_quant_resi=4)
    with torch.no_grad():
        for p in vq.parameters():
            p.normal_(std=0.1)
    return vq.eval().requires_grad_(False).to(device)


def gemm_gflops(device, n, repeats):
    a = torch.randn(n, n, device=device)
    t = bench(f"gemm {n}^3", lambda: a @ a, device=device, repeats=repeats, memory=False)
    return 2 * n**3 / t.median_ms / 1e6


def compare(name, kernel, reference, device, repeats, flops=None, gemm=None):
    k = bench(name + " [kernel]", kernel, device=device, repeats=repeats)
    with reference_backend():
        r = bench(name + " [reference]", reference, device=device, repeats=max(3, repeats // 3))
    row = {"case": name, "ref_ms": r.median_ms, "kernel_ms": k.median_ms,
           "kernel_p20_p80": f"{k.p20_ms:.3g}-{k.p80_ms:.3g}", "speedup": r.median_ms / k.median_ms,
           "ref_peak_MB": None if r.peak_bytes is None else r.peak_bytes / 2**20,
           "kernel_peak_MB": None if k.peak_bytes is None else k.peak_bytes / 2**20}
    if flops:
        row["kernel_GFLOP/s"] = flops / k.median_ms / 1e6
        row["ref_GFLOP/s"] = flops / r.median_ms / 1e6
        row["%gemm"] = 100 * row["kernel_GFLOP/s"] / gemm
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B in {1, 16} and fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); on a shared machine under "
                        "load, 1 thread avoids timing the scheduler (every parallel region waits for a busy core)")
    parser.add_argument("--out", help="JSON file (default: bench_results/quant-<date>.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = varcore.info(print_report=False)["ops"]
    missing = [op for op in ("nearest_code", "upsample_sum", "msrq_encode") if ops[op][args.device] != "kernel"]
    if missing:
        raise SystemExit(f"no compiled {missing} for {args.device}: build varcore first (see varcore.info())")

    dev = args.device
    header = machine_header()
    print_header("VAR quantiser: fused kernels vs reference composite", header)
    repeats = 5 if args.quick else 15
    batches = (1, 16) if args.quick else (1, 16, 64)
    vq = quantizer(dev)
    W = vq.embedding.weight
    phis = vq.phis_for(len(PATCH_NUMS))
    L = sum(pn * pn for pn in PATCH_NUMS)

    gemm = gemm_gflops(dev, 2048, repeats)
    z = torch.randn(16384, CVAE, device=dev)
    same_shape = bench("z @ e.T", lambda: z @ W.T, device=dev, repeats=repeats, memory=False)
    same_gemm = 2 * 16384 * V * CVAE / same_shape.median_ms / 1e6
    print(f"# fp32 GEMM: {gemm:.1f} GFLOP/s (2048^3), {same_gemm:.1f} GFLOP/s (16384x32 @ 32x4096)")
    header["gemm_gflops"] = {"2048^3": gemm, "16384x32@32x4096": same_gemm}

    rows = []
    g = torch.Generator(device=dev).manual_seed(1)
    for N in (16384, *(B * L for B in batches)):
        zN = torch.randn(N, CVAE, device=dev, generator=g)
        rows.append(compare(f"nearest_code N={N}", lambda: q.nearest_code(zN, W),
                            lambda: q.nearest_code(zN, W), dev, repeats, 2 * N * V * CVAE, gemm))
    for B in batches:
        f = torch.randn(B, CVAE, 16, 16, device=dev, generator=g)
        idx_Bl = vq.f_to_idxBl_or_fhat(f, to_fhat=False)
        rows.append(compare(f"msrq_encode B={B}", lambda: vq.f_to_idxBl_or_fhat(f, to_fhat=False),
                            lambda: vq.f_to_idxBl_or_fhat(f, to_fhat=False), dev, repeats))
        rows.append(compare(f"upsample_sum B={B}", lambda: q.upsample_sum(idx_Bl, W, phis, PATCH_NUMS),
                            lambda: q.upsample_sum(idx_Bl, W, phis, PATCH_NUMS), dev, repeats))
    print_table(rows, ["case", "ref_ms", "kernel_ms", "kernel_p20_p80", "speedup", "ref_peak_MB", "kernel_peak_MB",
                       "kernel_GFLOP/s", "%gemm"])
    print("wrote", write_json("quant", header, rows, args.out))


if __name__ == "__main__":
    main()
