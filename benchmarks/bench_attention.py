"""Block-causal attention: varcore's kernel vs dense masked SDPA vs compiled FlexAttention (ms, peak memory).

    python benchmarks/bench_attention.py [--quick] [--skip-flex] [--repeats N] [--device cpu|cuda]
                                         [--dtype float32] [--out FILE.json]

Shapes are VAR training's: B=4, H=16, D=64 over the 256 px pyramid (L=680) and the 512 px one (L=2240), with
the block-causal mask (a token sees its own scale and every earlier one). Forward, and forward + backward
through autograd. FlexAttention is compiled once before timing (its compile time is not counted). Ratios are
taken against SDPA measured in the same run, the kernel and SDPA taking turns call by call; the load average is
printed before and after, and the kernel's peak memory growth from L=680 to L=2240 is set against L's and L²'s.

On CUDA in float16/bfloat16 the run also times flash-attn's ``flash_attn_func`` when it is installed, without a
mask: full attention does 1.5-1.6x the block-causal work at these lengths (every key for every query), so its time
is the unmasked ceiling a masked kernel should stay under, not a like-for-like competitor. Whatever is left out
(flash-attn not installed or not applicable, FlexAttention with ``--skip-flex``) gets a row saying why.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from common import bench, bench_interleaved, machine_header, print_header, print_table, write_json

from varcore.ops import attention as att
from varcore.ops.extension import use_kernel

SCHEDULES = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
FLASH = "flash-attn unmasked"  # the row label of flash-attn's full (unmasked) attention, the ceiling


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


def flash_attention(device, dtype):
    """(f(q, k, v) in the (B, H, L, D) layout, None) running flash-attn without a mask, or (None, why not)."""
    if torch.device(device).type != "cuda":
        return None, "skipped: flash-attn runs on CUDA only"
    if dtype not in (torch.float16, torch.bfloat16):
        return None, f"skipped: flash-attn needs float16 or bfloat16, not {str(dtype)[6:]}"
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None, "skipped: flash-attn not installed"
    # flash-attn takes (B, L, H, D); the transposed views keep the head dim contiguous, so nothing is copied
    return (lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2),
            None)


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
    if not use_kernel("block_causal_attention", torch.device(args.device)):
        raise SystemExit(f"no compiled block_causal_attention kernel for {args.device}: build varcore first "
                         f"(see varcore.info())")
    dtype = getattr(torch, args.dtype)
    flash, flash_skip = flash_attention(args.device, dtype)

    header = machine_header()
    header.update(device=args.device, dtype=args.dtype, flash_attn=flash_skip or "timed (unmasked)",
                  flex="skipped: --skip-flex" if args.skip_flex else "timed")
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
        if flash is not None:
            impls[FLASH] = flash
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
            notes = {}
            for name in ("flex", FLASH):
                if name in calls:
                    try:
                        timings[name] = bench(f"{name} L={L} {mode}", calls[name], device=args.device, warmup=1,
                                              repeats=repeats)
                    except NotImplementedError as e:  # FlexAttention has no CPU backward
                        notes[name] = f"skipped: {e}".splitlines()[0]
                        print(f"# {name} {mode} L={L} not run: {e}".splitlines()[0])
            if args.skip_flex:
                notes["flex"] = "skipped: --skip-flex"
            if flash_skip:
                notes[FLASH] = flash_skip
            base = timings["sdpa"].median_ms
            for name, t in timings.items():
                rows.append({"L": L, "mode": mode, "impl": name, "median_ms": t.median_ms,
                             "p20_p80_ms": f"{t.p20_ms:.3g}-{t.p80_ms:.3g}",
                             "peak_MB": None if t.peak_bytes is None else t.peak_bytes / 2**20,
                             "time_vs_sdpa": t.median_ms / base, "repeats": t.repeats,
                             "note": "no mask: the unmasked ceiling" if name == FLASH else None})
            rows += [{"L": L, "mode": mode, "impl": name, "note": note} for name, note in notes.items()]
        write_json("attention", header, rows, args.out)  # so far: a run cut short keeps the lengths it measured
    header["loadavg_after"] = os.getloadavg()
    print_table(rows, ["L", "mode", "impl", "median_ms", "p20_p80_ms", "time_vs_sdpa", "peak_MB", "repeats", "note"])
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
