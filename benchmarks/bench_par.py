"""Raster (LlamaGen) vs PAR-4x vs PAR-16x decoding of one random-weight GPT on this machine, and optionally the
official PAR ``generate()`` on the same weights.

The three schedules share the transformer weights (PAR adds only its transition tokens), so the comparison isolates
the decoding schedule: 576 / 147 / 51 forward passes on a 24 x 24 grid, 256 / 67 / 31 on 16 x 16. Each schedule runs
in both sampler modes: ``parity`` (the model's modules, the official random draws) and ``fast`` (prepacked weights,
CFG mixed before the head; ``Transformer.pack_for_decoding``). Speed-ups are over raster decoding *in the same mode*, so
the fast mode speeds up the baseline too. Reported per (grid, batch, mode, schedule): forward passes, median seconds
per call, tokens/s (images/s with ``--vq``, which adds a random-weight VQ-16 decode) and the speed-up. CFG is on
(scale 1.5, the official default), so every step runs a doubled batch.

Timed calls are interleaved (one call of every case per round, ``--repeats`` rounds), so load from other processes
on a shared machine hits all cases alike; one untimed call per case warms up first (``--warmup``). Besides wall
time the table gives the process's CPU time per call (``cpu_s``) and the ratios of both (``*_cpu``): when the
machine is oversubscribed, wall time mostly measures the scheduler, CPU time the work (still slowed by shared
caches and memory bandwidth).

``--official-dir PATH`` (a checkout of github.com/YuqingWang1029/PAR; nothing of it is copied here) adds the
official ``autoregressive.models.generate.generate`` on an official ``Transformer`` loaded with the same state dict,
for PAR-4x and PAR-16x (the official ``generate`` does not run raster decoding), timed in the same rounds, and
checks that its tokens equal the parity mode's after the same ``torch.manual_seed``.

    python benchmarks/bench_par.py --threads 1                  # GPT-B shape, grids 24 and 16, batches 1 and 8
    python benchmarks/bench_par.py --threads 1 --grids 24 --batches 1 --official-dir /tmp/par_official
    python benchmarks/bench_par.py --quick                      # a 4-layer, 256-wide model, for a fast check
"""
import argparse
import importlib
import statistics
import sys
import time

import torch

from common import machine_header, print_header, print_table, write_json
from varcore.models.gpt import GPT_CONFIGS, ModelArgs, Transformer, generate
from varcore.sampling.par import PARSampler

SCHEDULES = {"raster": 1, "PAR-4x": 2, "PAR-16x": 4}


def model_args(n_layer, n_head, dim, grid, M, vocab=16384):
    return dict(n_layer=n_layer, n_head=n_head, dim=dim, vocab_size=vocab, block_size=grid * grid,
                spe_token_num=M * M - 1, ar_token_num=M * M)


def build_models(n_layer, n_head, dim, grid, seed=0):
    """One random-weight model per schedule, all with the same transformer weights."""
    models = {}
    torch.manual_seed(seed)
    shared = None
    for name, M in SCHEDULES.items():
        model = Transformer(ModelArgs(**model_args(n_layer, n_head, dim, grid, M)))
        if shared is None:
            torch.nn.init.normal_(model.output.weight, std=0.02)  # the official init zeroes the head
            shared = model.state_dict()
        else:
            model.load_state_dict(shared, strict=False)  # everything but the transition tokens
        models[name] = model.eval()
    return models


def load_official(path):
    """The official ``gpt`` and ``generate`` modules from a PAR checkout at ``path``."""
    sys.path.insert(0, path)
    try:
        return (importlib.import_module("autoregressive.models.gpt"),
                importlib.import_module("autoregressive.models.generate"))
    except ImportError as e:
        raise SystemExit(f"--official-dir {path}: cannot import autoregressive.models.gpt/generate ({e})")


def official_model(og, ours: Transformer, args: dict):
    """An official ``Transformer`` holding ``ours``'s weights (our state dict uses the official keys)."""
    model = og.Transformer(og.ModelArgs(**args))
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"official model does not take our state dict: missing {missing}, unexpected {unexpected}")
    return model.eval()


def build_vq():
    from varcore.models.vq16 import VQ_16

    return VQ_16().eval()


def timed(fn):
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def run_cases(cases, warmup, repeats):
    """{name: ([wall s], [cpu s])}: ``warmup`` untimed calls of every case, then ``repeats`` rounds of one call
    each."""
    for _ in range(warmup):
        for name, fn in cases.items():
            print(f"  warm-up {name}: {timed(fn)[0]:.2f} s", flush=True)
    times = {name: ([], []) for name in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            wall, cpu = timed(fn)
            times[name][0].append(wall)
            times[name][1].append(cpu)
            print(f"  round {r + 1}/{repeats} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 layers, width 256, 4 heads (default: GPT-B shape)")
    p.add_argument("--grids", type=int, nargs="+", default=[24, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", choices=["parity", "fast"], default=["parity", "fast"])
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (the median per case is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    p.add_argument("--vq", action="store_true", help="decode images with a random-weight VQ-16 (images/s)")
    p.add_argument("--official-dir", default=None,
                   help="a checkout of the official PAR repository: also time its generate() on the same weights")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 is steadier on a loaded shared machine)")
    p.add_argument("--out", default=None, help="JSON path (default bench_results/bench_par-<date>.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.official_dir and args.vq:
        raise SystemExit("--official-dir compares token generation; leave out --vq")
    og, ogen = load_official(args.official_dir) if args.official_dir else (None, None)
    n_layer, n_head, dim = (4, 4, 256) if args.quick else GPT_CONFIGS["GPT-B"]
    header = machine_header()
    header.update(model=dict(n_layer=n_layer, n_head=n_head, dim=dim, vocab=16384), cfg=args.cfg, vq=args.vq,
                  official_dir=args.official_dir, repeats=args.repeats, warmup=args.warmup)
    print_header(f"PAR vs raster decoding, {n_layer} layers x {dim} ({'quick' if args.quick else 'GPT-B shape'})",
                 header)
    with open("/proc/loadavg") as f:
        header["loadavg_start"] = f.read().split()[:3]
    vq = build_vq() if args.vq else None
    rows = []
    for grid in args.grids:
        models = build_models(n_layer, n_head, dim, grid)
        for B in args.batches:
            labels = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(B))
            cases, steps = {}, {}
            for mode in args.modes:
                for name, model in models.items():
                    sampler = PARSampler(model, vq=vq, fast=mode == "fast")
                    gen = torch.Generator()

                    def run(sampler=sampler, gen=gen):
                        gen.manual_seed(0)
                        if vq is None:
                            sampler.sample_tokens(labels, cfg_scale=args.cfg, generator=gen)
                        else:
                            sampler.sample(labels, cfg_scale=args.cfg, generator=gen)

                    cases[(mode, name)], steps[(mode, name)] = run, sampler.steps
            if og is not None:
                for name, M in list(SCHEDULES.items())[1:]:
                    official = official_model(og, models[name], model_args(n_layer, n_head, dim, grid, M))
                    kw = dict(cfg_scale=args.cfg, ar_token_num=M * M, spe_token_num=M * M - 1)
                    torch.manual_seed(0)
                    theirs = ogen.generate(official, labels, grid * grid, **kw)
                    torch.manual_seed(0)
                    mine = generate(models[name], labels, grid * grid, **kw)
                    same = torch.equal(theirs.long(), mine.long())
                    print(f"  official vs parity tokens {name} {grid}x{grid} B={B}: "
                          f"{'equal' if same else 'DIFFERENT'}", flush=True)
                    header[f"official_tokens_equal_{name}_{grid}_{B}"] = same

                    def run_official(official=official, kw=kw):
                        torch.manual_seed(0)
                        ogen.generate(official, labels, grid * grid, **kw)

                    cases[("official", name)], steps[("official", name)] = run_official, steps[(args.modes[0], name)]
            labelled = {f"{mode} {name} {grid}x{grid} B={B}": fn for (mode, name), fn in cases.items()}
            times = run_cases(labelled, args.warmup, args.repeats)
            for (mode, name), label in zip(cases, labelled):
                wall, cpu = (statistics.median(t) for t in times[label])
                row = dict(grid=f"{grid}x{grid}", batch=B, mode=mode, schedule=name, passes=steps[(mode, name)],
                           s_per_call=wall, min_s=min(times[label][0]), max_s=max(times[label][0]), cpu_s=cpu)
                row["images/s" if vq is not None else "tokens/s"] = B / wall if vq is not None else B * grid ** 2 / wall

                def ratio(other_mode, other_name, key):
                    other = times.get(f"{other_mode} {other_name} {grid}x{grid} B={B}")
                    if other is None or other_mode == mode and other_name == name:
                        return None
                    return statistics.median(other[0]) / wall, statistics.median(other[1]) / cpu

                for key, ref in (("vs_raster", (mode, "raster")), ("parity_over_fast", ("parity", name)),
                                 ("official_over_fast", ("official", name))):
                    r = ratio(*ref, key) if key == "vs_raster" or mode == "fast" else None
                    row[key], row[key + "_cpu"] = r if r else (None, None)
                rows.append(row)
    with open("/proc/loadavg") as f:
        header["loadavg_end"] = f.read().split()[:3]
    print(f"# load average at start {header['loadavg_start']}, at end {header['loadavg_end']} "
          f"({header['cores']} cores)")
    rate = "images/s" if vq is not None else "tokens/s"
    print_table(rows, ["grid", "batch", "mode", "schedule", "passes", "s_per_call", "min_s", "max_s", "cpu_s", rate,
                       "vs_raster", "vs_raster_cpu", "parity_over_fast", "parity_over_fast_cpu", "official_over_fast",
                       "official_over_fast_cpu"])
    print(f"wrote {write_json('bench_par', header, rows, args.out)}")


if __name__ == "__main__":
    main()
