"""Training-free accelerators against the plain fast sampler: measured speed-up against the FLOP-implied one.

The ``var`` family (random weights, official init, float32, tokens only: the VQVAE decode, which no accelerator
changes, is not timed):

* the baseline: ``VARSampler`` on a model shaped like VAR-d16 (depth 16, width 1024, 16 heads, V=4096, Cvae=32, the
  10-scale 256 px schedule), batch 8, with the official FID sampling settings (cfg 1.5, top-k 900, top-p 0.96);
* ``prune``: FastVAR token pruning, half the tokens of the last two scales (13x13 and 16x16) run;
* ``cfg_skip=2``: the last two scales without guidance; ``prune+cfg_skip``: both;
* ``CoDe N=8``: the same d16 drafting scales 0-7 and a refiner of depth 16 at 3/8 of the width (384, 6 heads of 64)
  drawing the last two: per token it costs 0.14 of the drafter, as CoDe's released d16 refiner costs 0.15 of its d30
  drafter (``bench_code.py --shape half`` runs that pair itself); ``CoDe+prune+cfg_skip``: with both accelerators.

The ``gpt`` family: raster decoding of a GPT shaped like LlamaGen's GPT-B on a 24x24 grid, batch 1, plain and with
speculative Jacobi decoding (``sjd=8/16/32``): seconds and forward passes (no FLOP model: a pass of a window costs
more than a plain step, by the window's tokens). With random weights the next-token distributions are nearly
uniform and change little with the prefix, so drafts pass far more often than on a trained model: the pass counts
of this family show the mechanics and the cost per pass, not a trained model's acceptance (``varcore eval --accel
digits-raster:sjd=8`` measures that on the bundled raster GPT).

``--quick`` runs the same cases on tiny models (VAR depth 2, width 128, 6 scales, batch 2; GPT 2 layers on 8x8) in
seconds.

Every case runs in turns with the baseline and the others (one call of each per round, the order rotating, after a
warm-up call each), so machine load falls on all of them alike; the figures are medians over the rounds. Per case:
seconds per call, the measured speed-up over the baseline, the speed-up its FLOPs imply (the baseline's FLOPs over
the case's, both from :func:`costs.var_run_flops` / :func:`costs.code_call_flops`: block linears, attention over the
keys attended, the head and the embeddings, from the configuration), and the share measured / implied. A share
below 1 is the cost that does not shrink with the FLOPs: the draw (filters, softmax and sampling of every token),
the head at pruned scales, per-scale overheads.

Families are entries of :data:`FAMILIES`, each a function of the parsed arguments that returns a :class:`Family`
(its baseline and cases); the rows of every family chosen with ``--families`` go into one table and JSON.

    python benchmarks/bench_accel.py --quick
    python benchmarks/bench_accel.py --repeats 3            # d16, batch 8 (about a minute per call on 2 cores)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from common import bench_interleaved, machine_header, print_header, print_table, write_json
from costs import code_call_flops, var_run_flops
from varcore.models import PATCH_NUMS, VAR, build_vae_var
from varcore.models.gpt import GPT_CONFIGS, ModelArgs, Transformer
from varcore.sampling.code import CoDeSampler
from varcore.sampling.par import PARSampler
from varcore.sampling.var import VARSampler

SHAPES = {
    "d16": dict(depth=16, V=4096, ch=160, patch_nums=PATCH_NUMS[256], B=8, refiner=(16, 384, 6), draft_steps=8),
    "quick": dict(depth=2, V=256, ch=32, patch_nums=(1, 2, 3, 4, 6, 8), B=2, refiner=(2, 64, 1), draft_steps=4),
}
SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)  # the official FID protocol


@dataclass
class Case:
    """One timed configuration: ``run()`` is one call; ``flops`` its FLOP-model count (None where the family has no
    FLOP model: its rows then give time and passes only); ``passes()`` the model forward calls of the last call;
    ``options`` the accelerator arguments as the sampler takes them."""

    run: Callable[[], object]
    flops: Optional[float]
    passes: Callable[[], int]
    options: dict = field(default_factory=dict)


@dataclass
class Family:
    """A baseline case and the cases measured against it, timed together; ``header`` describes the shapes."""

    baseline: str
    cases: Dict[str, Case]
    header: dict


def _refiner(vae, depth: int, width: int, heads: int, patch_nums) -> VAR:
    var = VAR(vae, depth=depth, embed_dim=width, num_heads=heads, attn_l2_norm=True, norm_eps=1e-6,
              patch_nums=patch_nums)
    var.init_weights(init_std=-1)
    return var


def var_family(args) -> Family:
    """The VAR-d16 sampler plain, with each accelerator and with CoDe (module docstring)."""
    shape = SHAPES["quick" if args.quick else "d16"]
    torch.manual_seed(0)
    pns = shape["patch_nums"]
    vae, var = build_vae_var(args.device, patch_nums=pns, V=shape["V"], ch=shape["ch"], depth=shape["depth"])
    refiner = _refiner(vae, *shape["refiner"], pns).to(args.device)
    var, refiner = var.eval(), refiner.eval()
    B, N, SN = args.batch or shape["B"], shape["draft_steps"], len(pns)
    labels = torch.arange(B, device=args.device) * 7 % 1000
    sampling = dict(SAMPLING, top_k=min(SAMPLING["top_k"], shape["V"]))
    prune = {SN - 2: 0.5, SN - 1: 0.5}
    single, code = VARSampler(var), CoDeSampler(var, refiner, N)

    def case(sampler, options):
        flops = (var_run_flops(var, B, **options)["total"] if sampler is single
                 else code_call_flops(var, refiner, N, B, **options)["total"])
        return Case(lambda: sampler.sample(B, labels, g_seed=0, output="tokens", **sampling, **options), flops,
                    lambda: SN, options)  # VAR: one pass per scale; CoDe: N drafter + SN - N refiner passes

    cases = {"plain": case(single, {}), "prune": case(single, {"prune": prune}),
             "cfg_skip=2": case(single, {"cfg_skip": 2}),
             "prune+cfg_skip": case(single, {"prune": prune, "cfg_skip": 2}),
             f"CoDe N={N}": case(code, {}), f"CoDe N={N}+prune+cfg_skip": case(code, {"prune": prune, "cfg_skip": 2})}
    depth, width, heads = shape["refiner"]
    header = {"model": f"VAR depth {shape['depth']}, width {var.C}, V={shape['V']}, scales {list(pns)}",
              "refiner": f"depth {depth}, width {width}, {heads} heads", "batch": B, "draft_steps": N,
              "prune": {str(k): v for k, v in prune.items()}, "sampling": sampling}
    return Family("plain", cases, header)


def gpt_family(args) -> Family:
    """Raster decoding of a GPT shaped like LlamaGen's GPT-B (12 layers, width 768, 12 heads, V=16384) on a 24x24
    grid (576 tokens), batch 1, fast mode, cfg 2.0, plain and with speculative Jacobi decoding (``sjd=W``)."""
    n_layer, n_head, dim = (2, 2, 64) if args.quick else GPT_CONFIGS["GPT-B"]
    grid, vocab = (8, 256) if args.quick else (24, 16384)
    torch.manual_seed(0)
    with torch.inference_mode(False):  # the sampler tracks the parameters' versions: no inference tensors
        model = Transformer(ModelArgs(n_layer=n_layer, n_head=n_head, dim=dim, vocab_size=vocab,
                                      block_size=grid * grid, ar_token_num=1, spe_token_num=0)).to(args.device)
        torch.nn.init.normal_(model.output.weight, std=0.02)  # the official init zeroes the head: uniform logits
        sampler = PARSampler(model.eval(), fast=True)
    B = args.batch or 1
    labels = torch.arange(B, device=args.device) * 7 % 1000

    def case(options):
        gen, passes = torch.Generator(args.device), []

        def run():  # the sampler is shared by the cases: keep this case's own pass count
            tokens = sampler.sample_tokens(labels, cfg_scale=2.0, generator=gen.manual_seed(0), **options)
            passes.append(sampler.forward_passes)
            return tokens

        return Case(run, None, lambda: passes[-1], options)

    windows = (4, 8) if args.quick else (8, 16, 32)
    cases = {"plain": case({}), **{f"sjd={w}": case({"sjd": w}) for w in windows}}
    header = {"model": f"GPT {n_layer} layers, width {dim}, {n_head} heads, V={vocab}, grid {grid}x{grid}, raster",
              "batch": B, "sampling": "cfg 2.0, no top-k/top-p, fast mode"}
    return Family("plain", cases, header)


# family name -> builder; a family's rows are measured against its own baseline
FAMILIES: Dict[str, Callable[[argparse.Namespace], Family]] = {
    "var": var_family,
    "gpt": gpt_family,
}


def measure(name: str, family: Family, repeats: int, device: str) -> list:
    """The rows of one family: its cases timed in turns (:func:`common.bench_interleaved`), speed-ups against the
    baseline, measured and FLOP-implied, and their share."""
    timings = bench_interleaved({k: c.run for k, c in family.cases.items()}, device=device, warmup=1,
                                repeats=repeats, memory=False)
    base_ms, base_flops = timings[family.baseline].median_ms, family.cases[family.baseline].flops
    rows = []
    for case_name, c in family.cases.items():
        t = timings[case_name]
        speedup = base_ms / t.median_ms
        implied = None if c.flops is None or base_flops is None else base_flops / c.flops
        rows.append({"family": name, "case": case_name, "options": {k: (v if not isinstance(v, dict) else
                                                                        {str(si): r for si, r in v.items()})
                                                                    for k, v in c.options.items()},
                     "s": t.median_ms / 1e3, "p20_s": t.p20_ms / 1e3, "p80_s": t.p80_ms / 1e3, "repeats": t.repeats,
                     "passes": c.passes(), "GFLOP": None if c.flops is None else c.flops / 1e9, "speedup": speedup,
                     "implied_speedup": implied, "share": None if implied is None else speedup / implied})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 8, quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, quick 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default=None, help="JSON output path (default bench_results/bench_accel-<date>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or 3
    header = machine_header()
    header.update(shape="quick" if args.quick else "d16", repeats=repeats, families={})
    rows = []
    with torch.inference_mode():
        for name in args.families:
            family = FAMILIES[name](args)
            header["families"][name] = dict(family.header, baseline=family.baseline)
            rows += measure(name, family, repeats, args.device)
            del family
    print_header("training-free accelerators: measured against FLOP-implied speed-up", header)
    for name, h in header["families"].items():
        print(f"# {name}: " + "; ".join(f"{k} {v}" for k, v in h.items()))
    print_table(rows, ["family", "case", "s", "p20_s", "p80_s", "passes", "GFLOP", "speedup", "implied_speedup",
                       "share"])
    path = write_json("bench_accel", header, rows, args.out)
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
