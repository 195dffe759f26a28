"""PAR token order ops: compiled kernel vs pure-PyTorch reference (ms, GB/s, speed-up, peak memory).

    python benchmarks/bench_par_order.py [--quick] [--device cpu|cuda] [--out FILE.json]

Shapes are those of the samplers: PAR-4x/16x on LlamaGen's 24x24 grid (token ids, int64) and a feature
payload (bf16, C=1024) as a model would reorder embeddings.
"""
import argparse

import torch

from common import bench, machine_header, print_header, print_table, write_json

import varcore
from varcore.ops import par_order as po


def cases(quick):
    batches = (8,) if quick else (8, 64)
    for B in batches:
        for M in (2, 4):
            yield f"gather ids B={B} M={M}", "gather", (B, 24, 24), torch.int64, M
            yield f"scatter ids B={B} M={M}", "scatter", (B, 576), torch.int64, M
        yield f"group_scatter ids B={B} M=2", "group", (B, 24, 24), torch.int64, 2
    yield "gather feats B=8 C=1024 bf16 M=2", "gather", (8, 24, 24, 1024), torch.bfloat16, 2
    yield "scatter feats B=8 C=1024 bf16 M=2", "scatter", (8, 576, 1024), torch.bfloat16, 2


def make_calls(kind, x, M):
    if kind == "gather":
        return (lambda: torch.ops.varcore.par_gather(x, M)), (lambda: po.par_gather_ref(x, M))
    if kind == "scatter":
        return (lambda: torch.ops.varcore.par_scatter(x, M)), (lambda: po.par_scatter_ref(x, M))
    tokens = torch.zeros(x.shape[0], M * M, dtype=x.dtype, device=x.device)
    return ((lambda: torch.ops.varcore.par_group_scatter_(x, tokens, 7, M)),
            (lambda: po.par_group_scatter_ref_(x, tokens, 7, M)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="JSON file (default: bench_results/par_order-<date>.json)")
    args = parser.parse_args()
    if varcore.info(print_report=False)["ops"]["par_gather"][args.device] != "kernel":
        raise SystemExit(f"no compiled kernel for {args.device}: build varcore first (see varcore.info())")

    header = machine_header()
    print_header("PAR order ops: kernel vs reference", header)
    repeats = 10 if args.quick else 50
    rows = []
    for name, kind, shape, dtype, M in cases(args.quick):
        x = torch.zeros(shape, dtype=dtype, device=args.device)
        kernel, reference = make_calls(kind, x, M)
        k = bench(name + " [kernel]", kernel, device=args.device, repeats=repeats)
        r = bench(name + " [reference]", reference, device=args.device, repeats=repeats)
        moved = 2 * (x.numel() if kind != "group" else x.shape[0] * M * M * (x.numel() // x.shape[0] // 576))
        nbytes = moved * x.element_size()  # read + write of every element moved
        rows.append({"case": name, "ref_ms": r.median_ms, "kernel_ms": k.median_ms,
                     "kernel_p20_p80": f"{k.p20_ms:.3g}-{k.p80_ms:.3g}", "kernel_GB/s": nbytes / k.median_ms / 1e6,
                     "ref_GB/s": nbytes / r.median_ms / 1e6, "speedup": r.median_ms / k.median_ms,
                     "kernel_peak_B": k.peak_bytes, "ref_peak_B": r.peak_bytes})
    print_table(rows, ["case", "ref_ms", "kernel_ms", "kernel_p20_p80", "ref_GB/s", "kernel_GB/s", "speedup",
                       "ref_peak_B", "kernel_peak_B"])
    print("wrote", write_json("par_order", header, rows, args.out))


if __name__ == "__main__":
    main()
