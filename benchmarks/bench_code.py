"""CoDe: collaborative decoding (drafter + refiner) against the drafter alone, float32 on random weights.

Shapes (width 64 * depth, heads = depth, V=4096, Cvae=32, the 10-scale 256 px schedule):

* ``bench`` (default): drafter depth 20, refiner depth 12 (width 64 * depth): the depth ratio of d30/d16 scaled
  down, but the refiner costs 0.22 of the drafter per token where d16 costs 0.15 of d30;
* ``half``: the official depths 30 and 16 at half the width (960 and 512, heads of 64): the same per-token cost
  ratio as d30/d16 (0.15) with a quarter of the weights, so its speed-ups are the ones that carry over to d30/d16;
* ``quick``: drafter depth 10, refiner depth 6 (the same 5:3 depth ratio) with a small decoder;
* ``official``: drafter d30 (2.0 B parameters), refiner d16 (310 M), batch 1 -- about 10 GB of float32 weights.

For N = 6..9 it reports images/s of ``CoDeSampler`` against ``VARSampler`` on the drafter alone, both timed
without the VQVAE decode (as CoDe's paper reports speed) and with the decode time (median of two calls after a warm-up) added back; the
KV-cache bytes of both (static caches, and the official ``torch.cat`` caches) and the measured peak memory of one
call. All configurations run in rounds, one call of each per round in a rotating order, so load from other
processes falls on all of them alike; the first round is an untimed warm-up under the memory profiler. The speed-up
is a ratio of medians measured in the same run. Tokens are drawn with CoDe's settings (cfg 1.5, top-k 600, top-p
0.96, temperature 1.1 for scales 0-6), official RNG parity mode.

    python benchmarks/bench_code.py --shape quick
    python benchmarks/bench_code.py --threads 1 --repeats 2      # the bench shape, batch 4 (~20 min loaded)
"""
import argparse
import statistics
import time

import torch

from common import bench, machine_header, peak_memory, print_header, print_table, write_json
from varcore.models import PATCH_NUMS, VAR, build_vae_var
from varcore.sampling.code import CoDeSampler
from varcore.sampling.var import VARSampler

SHAPES = {
    "bench": dict(drafter=20, refiner=12, ch=160, B=4),
    "half": dict(drafter=30, refiner=16, ch=160, B=4, width=0.5),
    "quick": dict(drafter=10, refiner=6, ch=32, B=4),
    "official": dict(drafter=30, refiner=16, ch=160, B=1),
}
SAMPLING = dict(cfg=1.5, top_k=600, top_p=0.96, temperature=[1.1] * 7 + [1.0] * 3)


def build(shape: dict):
    """Random-weight drafter and refiner (official init) on one VQVAE."""
    torch.manual_seed(0)
    width = shape.get("width", 1.0)
    # the official builder for the VQVAE (and the drafter at full width); a depth-1 VAR is discarded otherwise
    vae, drafter = build_vae_var("cpu", depth=shape["drafter"] if width == 1.0 else 1, ch=shape["ch"],
                                 patch_nums=PATCH_NUMS[256])
    if width != 1.0:
        drafter = _var(vae, shape["drafter"], width)
    return vae.eval(), drafter.eval(), _var(vae, shape["refiner"], width).eval()


def _var(vae, depth: int, width: float) -> VAR:
    """A VAR of ``depth`` blocks, width ``width * 64 * depth`` in heads of 64, official init."""
    heads = round(depth * width)
    var = VAR(vae, depth=depth, embed_dim=64 * heads, num_heads=heads, attn_l2_norm=True, norm_eps=1e-6,
              patch_nums=PATCH_NUMS[256])
    var.init_weights(init_std=-1)
    return var


def rounds(fns: dict, repeats: int):
    """Warm-up round under the memory profiler (peak bytes per config), then ``repeats`` timed rounds in a rotating
    order. Returns {name: (median ms, [ms], peak bytes)}."""
    names = list(fns)
    peaks = {}
    for name in names:
        peaks[name] = peak_memory(fns[name])
        print(f"# warm-up {name}: peak {peaks[name] and peaks[name] / 2**20:.0f} MiB", flush=True)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        print(f"# round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1] / 1e3:.1f} s" for n in names),
              flush=True)
    return {name: (statistics.median(times[name]), times[name], peaks[name]) for name in names}


def run(args):
    shape = dict(SHAPES[args.shape])
    B = args.batch or shape["B"]
    vae, drafter, refiner = build(shape)
    labels = torch.arange(B) * 7 % 1000
    steps = args.draft_steps
    alone = VARSampler(drafter)
    samplers = {N: CoDeSampler(drafter, refiner, N) for N in steps}
    fns = {"drafter alone": lambda: alone.sample(B, labels, g_seed=0, output="tokens", **SAMPLING)}
    for N in steps:
        fns[f"CoDe N={N}"] = (lambda s: lambda: s.sample(B, labels, g_seed=0, output="tokens", **SAMPLING))(
            samplers[N])
    f_hat = torch.randn(B, drafter.Cvae, 16, 16)
    with torch.no_grad():
        decode_ms = bench("decode", lambda: vae.fhat_to_img(f_hat), warmup=1, repeats=2, memory=False).median_ms
    res = rounds(fns, args.repeats)

    header = machine_header()
    header.update(shape=args.shape, drafter_depth=shape["drafter"], refiner_depth=shape["refiner"], batch=B,
                  sampling={k: v for k, v in SAMPLING.items()}, decode_ms=decode_ms, repeats=args.repeats,
                  load_average=_loadavg())
    base_ms = res["drafter alone"][0]
    alone_kv = alone.kv_cache_bytes(B)
    rows = [dict(config="drafter alone", s=base_ms / 1e3, img_s=B / (base_ms * 1e-3), speedup=1.0,
                 speedup_w_decode=1.0, kv_MiB=alone_kv / 2**20, kv_ratio=1.0,
                 official_kv_ratio=1.0, peak_MiB=_mib(res["drafter alone"][2]), peak_ratio=1.0)]
    for N in steps:
        ms, _, peak = res[f"CoDe N={N}"]
        report = samplers[N].memory_report(B)
        rows.append(dict(
            config=f"CoDe N={N}", s=ms / 1e3, img_s=B / (ms * 1e-3), speedup=base_ms / ms,
            speedup_w_decode=(base_ms + decode_ms) / (ms + decode_ms), kv_MiB=report["peak_bytes"] / 2**20,
            kv_ratio=report["peak_ratio"], official_kv_ratio=report["official_peak_ratio"], peak_MiB=_mib(peak),
            peak_ratio=None if peak is None or res["drafter alone"][2] is None else peak / res["drafter alone"][2]))
    return header, rows, res


def _mib(nbytes):
    return None if nbytes is None else nbytes / 2**20


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=tuple(SHAPES), default="bench")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 4, or 1 for --shape official)")
    p.add_argument("--draft-steps", type=int, nargs="+", default=[6, 7, 8, 9])
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 2, quick 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a loaded machine)")
    p.add_argument("--out", default=None, help="JSON output path (default bench_results/bench_code_<shape>.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (5 if args.shape == "quick" else 2)
    header, rows, _ = run(args)
    print_header(f"CoDe vs drafter alone, {args.shape} shape, float32", header)
    print(f"# batch {header['batch']}, drafter depth {header['drafter_depth']}, refiner depth "
          f"{header['refiner_depth']}; times exclude the VQVAE decode ({header['decode_ms'] / 1e3:.2f} s, measured "
          f"after a warm-up, added back in speedup_w_decode); load average at the end {header['load_average']}")
    print_table(rows, ["config", "s", "img_s", "speedup", "speedup_w_decode", "kv_MiB", "kv_ratio",
                       "official_kv_ratio", "peak_MiB", "peak_ratio"])
    path = write_json(f"bench_code_{args.shape}", header, rows, args.out)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
