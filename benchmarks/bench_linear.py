"""Few-row linear ops of cached decoding: the compiled ``decode_linear`` / ``decode_linear_rmsnorm`` against
``F.linear`` on the (out, in) weight, oneDNN's prepacked linear (when torch has it) and the references.

    python benchmarks/bench_linear.py [--quick] [--out FILE.json]

Shapes are those of a GPT-B-sized decoding step (width 768): the fused q|k|v projection (2304 x 768), SwiGLU's
w1|w3 (4096 x 768), w2 (768 x 2048) and the 16384-way head, at 2, 8 and 32 rows (raster decoding with CFG, PAR-4x,
PAR-16x). The variants of one case are timed in turns (``bench_interleaved``), float32 on the CPU; the table gives
median ms, the weight-read rate (GB/s: one read of the float32 weight per call) and the speed-up over ``F.linear``.
"""
import argparse

import torch
import torch.nn.functional as F

from common import bench_interleaved, machine_header, print_header, print_table, write_json

import varcore
from varcore.models.gpt import onednn_linear_available
from varcore.ops import linear

SHAPES = {"wqkv": (2304, 768), "w13": (4096, 768), "w2": (768, 2048), "head": (16384, 768)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer repeats")
    parser.add_argument("--out", help="JSON file (default: bench_results/linear-<date>.json)")
    args = parser.parse_args()
    if varcore.info(print_report=False)["ops"]["decode_linear"]["cpu"] != "kernel":
        raise SystemExit("no compiled decode_linear kernel: build varcore first (see varcore.info())")
    header = machine_header()
    print_header("Few-row linear ops: kernel vs F.linear", header)
    torch.manual_seed(0)
    shapes = {k: SHAPES[k] for k in ("wqkv", "w2")} if args.quick else SHAPES
    rows = []
    for name, (N, K) in shapes.items():
        weight = torch.randn(N, K)
        packed = linear.decode_linear_pack(weight)
        norm = torch.rand(K) + 0.5
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight) if onednn_linear_available() else None
        for R in (2, 8, 32):
            x = torch.randn(R, K)
            fns = {"F.linear": lambda: F.linear(x, weight),
                   "kernel": lambda: linear.decode_linear(x, packed, N),
                   "reference": lambda: linear.decode_linear_ref(x, packed, N),
                   "rmsnorm+F.linear": lambda: F.linear(F.rms_norm(x, (K,), norm, 1e-5), weight),
                   "kernel rmsnorm": lambda: linear.decode_linear_rmsnorm(x, packed, N, norm, 1e-5)}
            if onednn is not None:
                fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")
            times = bench_interleaved(fns, repeats=5 if args.quick else 25, memory=False)
            base = times["F.linear"].median_ms
            for variant, t in times.items():
                rows.append({"case": f"{name} {N}x{K} R={R}", "variant": variant, "ms": t.median_ms,
                             "p20_p80": f"{t.p20_ms:.3g}-{t.p80_ms:.3g}", "weight_GB/s": 4 * N * K / t.median_ms / 1e6,
                             "vs_F.linear": base / t.median_ms})
    print_table(rows, ["case", "variant", "ms", "p20_p80", "weight_GB/s", "vs_F.linear"])
    print("wrote", write_json("linear", header, rows, args.out))


if __name__ == "__main__":
    main()
