"""VAR sampling: the drop-in ``autoregressive_infer_cfg`` against ``VARSampler`` (float32, bfloat16 and "auto").

Random weights shaped like VAR-d16 (depth 16, width 1024, V=4096, the 10-scale 256 px schedule, the real VQVAE
shape) or, with ``--quick``, a depth-4 model with a small decoder. For each batch size: images/s, ms per scale
(transformer and sampling, the decode subtracted), KV-cache and peak memory, FLOPs per image from the config and the
achieved GFLOP/s against this machine's GEMM throughput measured in the same run (the highest of readings taken
before the runs and after each batch size), and whether the tokens agree. ``VARSampler(dtype="auto")`` runs as its
own configuration ("fast auto"), with the dtype it chose and the bf16 GEMM speed-up it measured in the header, and
its time over the fast float32 time among the ratios.

The full mode runs each configuration once (twice at batch 1; a d16 image costs ~600 GFLOP) and skips what would
overrun ``--budget-min``, saying so. The first round runs each configuration once under the memory profiler; the
other rounds run them in turns, the order rotating from round to round, so that load falls on all of them alike;
times are medians over the rounds.

    python benchmarks/bench_sampler.py --quick
    python benchmarks/bench_sampler.py            # d16, batches 8, 32, 1 (in that order)
"""
import argparse
import statistics
import time

import torch

from costs import flops_per_image, gemm_gflops
from common import bench, machine_header, peak_memory, print_header, print_table, write_json
from varcore.models import PATCH_NUMS, build_vae_var
from varcore.sampling.auto_dtype import bf16_speedup
from varcore.sampling.var import VARSampler

SHAPES = {
    "d16": dict(depth=16, V=4096, ch=160),  # width 64 * depth = 1024, 16 heads
    "quick": dict(depth=4, V=4096, ch=32),
}
SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)  # the official FID protocol
DECODE_BATCH = 8  # the fast sampler decodes 8 images at a time (bounds the decoder's memory at batch 32)


def linear_gemm_gflops(dtype) -> float:
    """GFLOP/s of a 4096 x 1024 @ 1024 x 4096 matmul, the shape class of the model's linears."""
    return gemm_gflops(dtype, 4096, 1024, 4096, repeats=5)


def measure(fn):
    """One run under the memory profiler: its ms, its peak memory and its result."""
    times, out = [], []

    def timed():
        t0 = time.perf_counter()
        out.append(fn())
        times.append((time.perf_counter() - t0) * 1e3)

    peak = peak_memory(timed)
    if not times:  # the profiler failed (peak_memory returns None): time the run without it
        timed()
    return times[0], peak, out[0]


CONFIGS = ("drop-in", "fp32", "bf16", "auto")


def _config_name(path: str, dtype) -> str:
    """The --configs name of a configuration: drop-in, fp32 / bf16 (the fast sampler), auto."""
    return path if path in ("drop-in", "auto") else {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def agreement(a, b) -> float:
    return sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)


def run(args):
    torch.manual_seed(0)
    vae, var = build_vae_var("cpu", **SHAPES[args.shape], patch_nums=PATCH_NUMS[256])
    var.eval()
    vae.eval()
    samplers = {dt: VARSampler(var, dtype=dt, decode_batch=DECODE_BATCH) for dt in (torch.float32, torch.bfloat16)}
    auto = VARSampler(var, dtype="auto", decode_batch=DECODE_BATCH)
    # GEMM throughput before the runs and after each batch size: this machine's speed drifts by up to ~30%, and
    # a single low reading would loosen the FLOP bound; the highest reading (the strictest bound) is used
    # the ceilings of the dtypes that run (a bf16 GEMM reading takes minutes on a CPU without bf16 instructions)
    bf16_runs = "bf16" in args.configs or ("auto" in args.configs and auto.dtype == torch.bfloat16)
    gemm_samples = {dt: [linear_gemm_gflops(dt)] for dt in (torch.float32, torch.bfloat16)
                    if dt == torch.float32 or bf16_runs}
    flops = flops_per_image(var)
    SN = len(var.patch_nums)
    header = machine_header()
    header.update(shape=args.shape, flops_per_image=flops, sampling=SAMPLING, decode_batch=DECODE_BATCH,
                  auto_dtype=str(auto.dtype)[6:], bf16_gemm_speedup=bf16_speedup("cpu"))
    start = time.perf_counter()
    per_image_s = None  # the drop-in's seconds per image, to predict run times against the budget
    rows, results = [], {}

    def over_budget(B, factor):
        if per_image_s is None:
            return False
        return time.perf_counter() - start + factor * per_image_s * B > args.budget_min * 60

    for B in args.batches:
        labels = torch.arange(B) % 1000
        small = B <= 8 if args.quick else B == 1
        repeats = args.repeats or (3 if args.quick and small else 2 if small else 1)
        # subtracted from every configuration's time: a disturbed decode timing would skew them all, so at least
        # two timed runs (three for the quick small batches)
        decode = bench(f"decode B={B}", lambda: vae.fhat_to_img(torch.randn(B, var.Cvae, 16, 16)), warmup=1,
                       repeats=3 if args.quick and small else 2, memory=False)
        configs = [("drop-in", torch.float32, lambda: var.autoregressive_infer_cfg(
                        B, labels, g_seed=0, return_idx_Bl=True, **SAMPLING)[1]),
                   ("fast", torch.float32, lambda: samplers[torch.float32].sample(
                        B, labels, g_seed=0, output="both", **SAMPLING)[1]),
                   ("fast", torch.bfloat16, lambda: samplers[torch.bfloat16].sample(
                        B, labels, g_seed=0, output="both", **SAMPLING)[1]),
                   ("auto", auto.dtype, lambda: auto.sample(B, labels, g_seed=0, output="both", **SAMPLING)[1])]
        chosen = [(path, dtype, fn) for path, dtype, fn in configs if _config_name(path, dtype) in args.configs]
        if args.quick and small:
            for _, _, fn in chosen:
                fn()  # warm-up (first-call allocations, thread pools)
        times, firsts, ran = {}, {}, []
        for path, dtype, fn in chosen:  # round 1: each configuration once, under the memory profiler
            name = f"fast auto ({str(dtype)[6:]})" if path == "auto" else f"{path} {str(dtype)[6:]}"
            if over_budget(B, repeats * (0.5 if dtype == torch.bfloat16 else 1.0)):
                rows.append(dict(B=B, path=name, note="skipped: over the time budget"))
                print(f"# skipped {name} B={B} (time budget)", flush=True)
                continue
            ms, peak, tokens = measure(fn)
            times[name], firsts[name] = [ms], (path, dtype, peak, tokens)
            ran.append((name, fn))
            if path == "drop-in":
                per_image_s = ms / 1e3 / B
            print(f"# {name} B={B}: {ms / 1e3:.1f} s  ({(time.perf_counter() - start) / 60:.1f} min so far)",
                  flush=True)
        for r in range(1, repeats):  # the other rounds in turns, the order rotating: load falls on all alike
            for name, fn in ran[r % len(ran):] + ran[:r % len(ran)]:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name, _ in ran:
            path, dtype, peak, tokens = firsts[name]
            results[(B, path, dtype)] = (statistics.median(times[name]), peak, tokens)
        for name, _ in ran:
            path, dtype, peak, tokens = firsts[name]
            ms = results[(B, path, dtype)][0]
            model_ms = ms - decode.median_ms
            if model_ms < 0.05 * ms:  # the decode alone took (nearly) as long: its timing was disturbed
                print(f"# {name} B={B}: {ms:.0f} ms total but the decode was timed at {decode.median_ms:.0f} ms; "
                      f"per-scale time and GFLOP/s not reported (load on the machine?)", flush=True)
                model_ms = None
            ref = results.get((B, "drop-in", torch.float32)) or results.get((B, "fast", torch.float32))
            kv = samplers[dtype].kv_cache_bytes(B) if path != "drop-in" else samplers[dtype].concat_kv_cache_bytes(B)
            achieved = None if model_ms is None else flops * B / (model_ms * 1e-3) / 1e9
            rows.append(dict(
                B=B, path=name, ms=ms, img_s=B / (ms * 1e-3), ms_scale=None if model_ms is None else model_ms / SN,
                decode_ms=decode.median_ms, kv_MiB=kv / 2**20, peak_MiB=None if peak is None else peak / 2**20,
                GFLOP_s=achieved, dtype=dtype, repeats=len(times[name]),
                tokens_vs_fp32=None if ref is None or ref[2] is tokens else agreement(tokens, ref[2])))
        for dt, readings in gemm_samples.items():
            readings.append(linear_gemm_gflops(dt))
    gemm = {dt: max(readings) for dt, readings in gemm_samples.items()}
    header.update(gemm_gflops_fp32=gemm[torch.float32], gemm_gflops_bf16=gemm.get(torch.bfloat16),
                  gemm_gflops_fp32_readings=gemm_samples[torch.float32],
                  gemm_gflops_bf16_readings=gemm_samples.get(torch.bfloat16))
    for row in rows:
        dtype, achieved = row.pop("dtype", None), row.get("GFLOP_s")
        if "ms" in row:
            row["pct_gemm"] = None if achieved is None else 100 * achieved / gemm[dtype]
    return header, rows, results, flops, gemm


def ratios(rows, results, flops, gemm):
    """The comparisons of the run, one row each (measured quantity and its value; absent when not measured):
    fast against drop-in time and tokens in float32 at batch 8, the fast float32 time over the bound
    "FLOPs / GEMM throughput + decode", bfloat16's images/s and tokens against the drop-in float32, and the
    batch-32 peak memory of the fast paths over the drop-in's."""
    def get(B, path, dtype):
        return results.get((B, path, dtype))

    out = []
    drop8, fast8, bf8 = get(8, "drop-in", torch.float32), get(8, "fast", torch.float32), get(8, "fast", torch.bfloat16)
    row8 = next((r for r in rows if r.get("B") == 8 and "decode_ms" in r), None)
    if drop8 and fast8:
        bound_ms = flops * 8 / (gemm[torch.float32] * 1e9) * 1e3 + row8["decode_ms"]
        out.append(dict(ratio="fp32 B=8: fast time / drop-in time", value=fast8[0] / drop8[0]))
        out.append(dict(ratio="fp32 B=8: tokens equal to the drop-in's (fraction)",
                        value=agreement(fast8[2], drop8[2])))
        out.append(dict(ratio="fp32 B=8: fast time / (FLOPs / GEMM + decode)", value=fast8[0] / bound_ms))
    if drop8 and bf8:
        out.append(dict(ratio="bf16 B=8: images/s / drop-in fp32 images/s", value=drop8[0] / bf8[0]))
        out.append(dict(ratio="bf16 B=8: tokens equal to the fp32 ones (fraction)",
                        value=agreement(bf8[2], drop8[2])))
    for B in sorted({key[0] for key in results}):
        fp32, auto = get(B, "fast", torch.float32), next((v for k, v in results.items() if k[:2] == (B, "auto")), None)
        if fp32 and auto:
            out.append(dict(ratio=f"B={B}: fast auto time / fast fp32 time", value=auto[0] / fp32[0]))
    drop32 = get(32, "drop-in", torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        fast32 = get(32, "fast", dtype)
        if drop32 and fast32 and drop32[1] and fast32[1]:
            out.append(dict(ratio=f"B=32: peak memory fast {str(dtype)[6:]} / drop-in fp32",
                            value=fast32[1] / drop32[1]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a depth-4 model with a small decoder (about 5 min)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 8 32 1, quick: 1 8 32)")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per configuration (default: automatic)")
    parser.add_argument("--budget-min", type=float, default=14.0, help="skip runs predicted to overrun this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="configurations to run (default: all); e.g. 'fp32 auto' to compare dtype auto alone "
                             "on a CPU whose bf16 GEMM is slow")
    parser.add_argument("--json", help="output file (default: bench_results/bench_sampler-<date>.json)")
    args = parser.parse_args()
    args.shape = "quick" if args.quick else "d16"
    args.batches = args.batches or ([1, 8, 32] if args.quick else [8, 32, 1])
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        header, rows, results, flops, gemm = run(args)
    print_header(f"VAR sampler, {args.shape} shape, {flops / 1e9:.0f} GFLOP per image; GEMM fp32 "
                 f"{gemm[torch.float32]:.0f}, bf16 {gemm.get(torch.bfloat16, float('nan')):.0f} GFLOP/s", header)
    print_table(rows, ["B", "path", "ms", "img_s", "ms_scale", "decode_ms", "kv_MiB", "peak_MiB", "GFLOP_s",
                       "pct_gemm", "tokens_vs_fp32", "repeats", "note"])
    compared = ratios(rows, results, flops, gemm)
    if compared:
        print()
        print_table(compared, ["ratio", "value"])
    print(f"\nwrote {write_json('bench_sampler', header, rows + compared, args.json)}")


if __name__ == "__main__":
    main()
