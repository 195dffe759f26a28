"""Block-causal attention: varcore's kernel vs dense masked SDPA vs compiled FlexAttention (ms, peak memory).

    python benchmarks/bench_attention.py [--quick] [--skip-flex] [--repeats N] [--device cpu|cuda]
                                         [--dtype float32] [--out FILE.json]

Shapes are VAR training's: B=4, H=16, D=64 over the 256 px pyramid (L=680) and the 512 px one (L=2240), with
the block-causal mask (a token sees its own scale and every earlier one). Forward, and forward + backward
through autograd. FlexAttention is compiled once before timing (its compile time is not counted). Ratios are
taken against SDPA measured in the same run, the kernel and SDPA taking turns call by call; the load average is
printed before and after, and the kernel's peak memory growth from L=680 to L=2240 is set against L's and L²'s.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from common import bench, bench_interleaved, machine_header, print_header, print_table, write_json

from varcore.ops import attention as att

SCHEDULES = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}


def implementations(ends, L, device):
    """name -> f(q, k, v) returning the attention output, all in the (B, H, L, D) layout."""
    mask = att.visible_end_mask(ends, L)
    impls = {
        "kernel": lambda q, k, v: att.block_causal_attention(q, k, v, ends)[0],
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(lambda b, h, qi, ki: ki < ends[qi], None, None, L, L, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        impls["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    except ImportError:
        pass
    return impls


def fwd_bwd(fn, q, k, v, grad):
    def run():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)
    return run


def memory_growth(rows):
    """The kernel's forward+backward peak memory at L=2240 over L=680, beside the growth of L and of L²
    (a dense L x L buffer would grow with L²); None unless both lengths were measured."""
    peak = {r["L"]: r["peak_MB"] for r in rows if r["impl"] == "kernel" and r["mode"] == "forward+backward"}
    if sorted(peak) != [680, 2240] or None in peak.values():
        return None
    return {"peak_growth": peak[2240] / peak[680], "L_growth": 2240 / 680, "L2_growth": (2240 / 680) ** 2}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L=680 only, fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per implementation (default 7)")
    parser.add_argument("--skip-flex", action="store_true", help="leave out FlexAttention (slow on the CPU)")
    parser.add_argument("--out", help="JSON file (default: bench_results/attention-<date>.json)")
    args = parser.parse_args()
    if att.attention_backend(args.device, masked=True) != "kernel":
        raise SystemExit(f"no compiled kernel for {args.device}: build varcore first (see varcore.info())")
    dtype = getattr(torch, args.dtype)

    header = machine_header()
    header["loadavg_before"] = os.getloadavg()
    print_header(f"block-causal attention, B=4 H=16 D=64 {args.dtype}: kernel vs dense masked SDPA vs FlexAttention",
                 header)
    print(f"# load average before: {header['loadavg_before'][0]:.2f} (1 min) on {os.cpu_count()} cores")
    repeats = 3 if args.quick else args.repeats
    rows = []
    for L in (680,) if args.quick else (680, 2240):
        ends = att.var_visible_end(SCHEDULES[L], device=args.device)
        g = torch.Generator(device=args.device).manual_seed(0)
        q, k, v = (torch.randn(4, 16, L, 64, generator=g, device=args.device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(4, 16, L, 64, generator=g, device=args.device, dtype=dtype)
        impls = implementations(ends, L, args.device)
        if args.skip_flex:
            impls.pop("flex", None)
        for mode in ("forward", "forward+backward"):
            calls = {}
            for name, fn in impls.items():
                if mode == "forward":
                    def call(fn=fn):
                        with torch.no_grad():
                            fn(q.detach(), k.detach(), v.detach())
                else:
                    call = fwd_bwd(fn, q, k, v, grad)
                calls[name] = call
            # The kernel and SDPA take turns, so that their ratio is fair on a busy machine; FlexAttention
            # (far slower on the CPU) is timed on its own.
            timings = bench_interleaved({n: calls[n] for n in ("kernel", "sdpa")}, device=args.device, warmup=1,
                                        repeats=repeats)
            if "flex" in calls:
                try:
                    timings["flex"] = bench(f"flex L={L} {mode}", calls["flex"], device=args.device, warmup=1,
                                            repeats=repeats)
                except NotImplementedError as e:  # FlexAttention has no CPU backward
                    print(f"# flex {mode} L={L} not run: {e}".splitlines()[0])
            base = timings["sdpa"].median_ms
            for name, t in timings.items():
                rows.append({"L": L, "mode": mode, "impl": name, "median_ms": t.median_ms,
                             "p20_p80_ms": f"{t.p20_ms:.3g}-{t.p80_ms:.3g}",
                             "peak_MB": None if t.peak_bytes is None else t.peak_bytes / 2**20,
                             "time_vs_sdpa": t.median_ms / base, "repeats": t.repeats})
    header["loadavg_after"] = os.getloadavg()
    print_table(rows, ["L", "mode", "impl", "median_ms", "p20_p80_ms", "time_vs_sdpa", "peak_MB", "repeats"])
    print(f"# load average after: {header['loadavg_after'][0]:.2f} (1 min) on {os.cpu_count()} cores; "
          f"figures taken under load are noisy (compare the ratios, which come from interleaved runs)")
    growth = memory_growth(rows)
    if growth:
        header["memory_growth"] = growth
        print(f"# kernel peak memory fwd+bwd grows {growth['peak_growth']:.2f}x from L=680 to L=2240 "
              f"(L: {growth['L_growth']:.2f}x, L²: {growth['L2_growth']:.1f}x)")
    print("wrote", write_json("attention", header, rows, args.out))


if __name__ == "__main__":
    main()
