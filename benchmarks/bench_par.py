"""Raster (LlamaGen) vs PAR-4x vs PAR-16x decoding of one random-weight GPT on this machine.

The three samplers share the transformer weights (PAR adds only its transition tokens), so the comparison isolates
the decoding schedule: 576 / 147 / 51 forward passes on a 24 x 24 grid, 256 / 67 / 31 on 16 x 16. Reported per
(grid, batch, schedule): forward passes, median seconds per call, tokens/s (images/s with ``--vq``, which adds a
random-weight VQ-16 decode) and the speed-up over raster measured in the same run. CFG is on (scale 1.5, the
official default), so every step runs a doubled batch.

    python benchmarks/bench_par.py            # GPT-B shape, grids 24 and 16, batches 1 and 8
    python benchmarks/bench_par.py --quick    # a 4-layer, 256-wide model, for a fast check
"""
import argparse

import torch

from common import bench, machine_header, print_header, print_table, write_json
from varcore.models.gpt import GPT_CONFIGS, ModelArgs, Transformer
from varcore.sampling.par import PARSampler

SCHEDULES = {"raster": 1, "PAR-4x": 2, "PAR-16x": 4}


def build_models(n_layer, n_head, dim, grid, vocab, seed=0):
    """One random-weight model per schedule, all with the same transformer weights."""
    models = {}
    torch.manual_seed(seed)
    shared = None
    for name, M in SCHEDULES.items():
        model = Transformer(ModelArgs(n_layer=n_layer, n_head=n_head, dim=dim, vocab_size=vocab,
                                      block_size=grid * grid, spe_token_num=M * M - 1, ar_token_num=M * M))
        if shared is None:
            torch.nn.init.normal_(model.output.weight, std=0.02)  # the official init zeroes the head
            shared = model.state_dict()
        else:
            model.load_state_dict(shared, strict=False)  # everything but the transition tokens
        models[name] = model.eval()
    return models


def build_vq():
    from varcore.models.vq16 import VQ_16

    return VQ_16().eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 layers, width 256, 4 heads (default: GPT-B shape)")
    p.add_argument("--grids", type=int, nargs="+", default=[24, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case")
    p.add_argument("--vq", action="store_true", help="decode images with a random-weight VQ-16 (images/s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 is faster on a loaded shared machine)")
    p.add_argument("--out", default=None, help="JSON path (default bench_results/bench_par-<date>.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_layer, n_head, dim = (4, 4, 256) if args.quick else GPT_CONFIGS["GPT-B"]
    header = machine_header()
    header.update(model=dict(n_layer=n_layer, n_head=n_head, dim=dim, vocab=16384), cfg=args.cfg, vq=args.vq)
    print_header(f"PAR vs raster decoding, {n_layer} layers x {dim} ({'quick' if args.quick else 'GPT-B shape'})",
                 header)
    vq = build_vq() if args.vq else None
    rows = []
    for grid in args.grids:
        models = build_models(n_layer, n_head, dim, grid, 16384)
        for B in args.batches:
            labels = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(B))
            base = None
            for name, model in models.items():
                sampler = PARSampler(model, vq=vq)
                gen = torch.Generator()

                def run():
                    gen.manual_seed(0)
                    if vq is None:
                        sampler.sample_tokens(labels, cfg_scale=args.cfg, generator=gen)
                    else:
                        sampler.sample(labels, cfg_scale=args.cfg, generator=gen)

                t = bench(f"{name} {grid}x{grid} B={B}", run, warmup=args.warmup, repeats=args.repeats, memory=False)
                sec = t.median_ms / 1e3
                base = sec if base is None else base
                row = dict(grid=f"{grid}x{grid}", batch=B, schedule=name, passes=sampler.steps, s_per_call=sec,
                           p20_s=t.p20_ms / 1e3, p80_s=t.p80_ms / 1e3, speedup=base / sec)
                row["images/s" if vq is not None else "tokens/s"] = B / sec if vq is not None else B * grid ** 2 / sec
                rows.append(row)
                print_table([row], list(row))
    print()
    rate = "images/s" if vq is not None else "tokens/s"
    print_table(rows, ["grid", "batch", "schedule", "passes", "s_per_call", "p20_s", "p80_s", rate, "speedup"])
    print(f"wrote {write_json('bench_par', header, rows, args.out)}")


if __name__ == "__main__":
    main()
