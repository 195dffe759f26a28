"""Images/s against batch size for VAR, CoDe (each N), PAR-4x and raster decoding, and their KV-cache memory.

The models are the bundled digits models (``varcore.digits``: a depth-4 VAR drafter and a depth-2 refiner on a
4-scale, 512-code tokenizer; two 4-layer GPTs on a 16x16, 256-code grid), with the bundled weights when they are
installed (in whatever state of training), otherwise with the same architectures and random weights (the time
does not depend on the weights, and the JSON says which). Every call samples tokens and decodes them to 16x16 images with the model's tokenizer;
CFG 1.5, no top-k/top-p. Timings are medians after a warm-up call; the KV cache is what each sampler allocates
for the batch (static caches: VARSampler's, CoDe's peak of drafter and refiner, the GPT's ``setup_caches``).

    python benchmarks/bench_batch.py [--quick] [--batches 1 4 16] [--out FILE.json]
    python benchmarks/bench_batch.py --par-rounds 20 [--fast] [--batches 1 2 4 8]   # PAR-4x / raster, interleaved
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, machine_header, print_header, print_table, write_json  # noqa: E402

CFG = 1.5


def load_digits_models() -> tuple[dict, bool]:
    """The digits models by part name, and whether they carry trained weights."""
    from varcore.digits import recipe

    trained = all(recipe.weights_path(p).is_file() for p in ("vqvae", "var-drafter", "var-refiner", "vq",
                                                             "gpt-par", "gpt-raster"))
    if trained:
        vae = recipe.load_weights("vqvae")
        models = {"vqvae": vae, **{p: recipe.load_weights(p, vae=vae) for p in ("var-drafter", "var-refiner")},
                  **{p: recipe.load_weights(p) for p in ("vq", "gpt-par", "gpt-raster")}}
        return models, True
    torch.manual_seed(0)
    vae = recipe.build("vqvae").eval()
    models = {"vqvae": vae, **{p: recipe.build(p, vae=vae).eval() for p in ("var-drafter", "var-refiner")},
              **{p: recipe.build(p).eval() for p in ("vq", "gpt-par", "gpt-raster")}}
    for p in ("gpt-par", "gpt-raster"):  # the official init zeroes the head: give it random weights
        torch.nn.init.normal_(models[p].output.weight, std=0.02)
    return models, False


def gpt_kv_cache_bytes(model, B: int, cfg: bool = True) -> int:
    """Bytes of the static KV caches ``setup_caches`` allocates for a batch of B (2B rows under CFG)."""
    from varcore.models.gpt import find_multiple

    c = model.config
    kv_heads = c.n_kv_head or c.n_head
    rows = 2 * B if cfg else B
    elem = model.tok_embeddings.weight.element_size()
    return c.n_layer * 2 * rows * find_multiple(model.block_size, 8) * kv_heads * c.head_dim * elem


def samplers(models: dict) -> dict:
    """name -> (sample(B, labels), kv_cache_bytes(B), forward passes)."""
    from varcore.sampling.var import VARSampler

    vae, drafter, refiner = models["vqvae"], models["var-drafter"], models["var-refiner"]
    var_s = VARSampler(drafter, vae)
    out = {"VAR": (lambda B, y: var_s.sample(B, y, g_seed=0, cfg=CFG), var_s.kv_cache_bytes, var_s.SN)}
    try:
        from varcore.sampling.code import CoDeSampler
    except ImportError:
        CoDeSampler = None
    if CoDeSampler is not None:
        for N in range(1, var_s.SN):
            code = CoDeSampler(drafter, refiner, N, vae)
            out[f"CoDe N={N}"] = (lambda B, y, code=code: code.sample(B, y, g_seed=0, cfg=CFG),
                                  lambda B, code=code: code.kv_cache_bytes(B)["peak"], var_s.SN + 1)
    return {**out, **gpt_samplers(models)}


def gpt_samplers(models: dict, fast: bool = False) -> dict:
    """The PAR-4x and raster entries of :func:`samplers`; ``fast`` picks PARSampler's fast mode."""
    from varcore.sampling.par import PARSampler

    out = {}
    for name, part in (("PAR-4x", "gpt-par"), ("raster", "gpt-raster")):
        ps = PARSampler(models[part], vq=models["vq"], fast=fast)

        def run(B, y, ps=ps):
            return ps.sample(y, cfg_scale=CFG, generator=torch.Generator().manual_seed(0))

        out[name] = (run, lambda B, m=models[part]: gpt_kv_cache_bytes(m, B), ps.steps)
    return out


def run(batches, repeats: int) -> tuple[list, bool]:
    models, trained = load_digits_models()
    rows = []
    with torch.inference_mode():
        for name, (sample, kv_bytes, passes) in samplers(models).items():
            for B in batches:
                labels = torch.arange(B) % 10
                t = bench(f"{name} B={B}", lambda: sample(B, labels), warmup=1, repeats=repeats, memory=False)
                rows.append(dict(sampler=name, B=B, passes=passes, ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                                 img_s=B / (t.median_ms * 1e-3), kv_KiB=kv_bytes(B) / 2**10, repeats=t.repeats))
                print(f"# {name} B={B}: {rows[-1]['img_s']:.1f} images/s", flush=True)
    return rows, trained


def par_vs_raster(batches, rounds: int, fast: bool = False) -> tuple[list, bool]:
    """PAR-4x against raster decoding in interleaved rounds (one call of each per round, so that the machine's drift
    hits both alike): per batch size the median times and the p20/p50/p80 of the per-round time ratios."""
    models, trained = load_digits_models()
    cases = gpt_samplers(models, fast)
    rows = []
    with torch.inference_mode():
        for B in batches:
            labels = torch.arange(B) % 10
            times = {k: [] for k in cases}
            for r in range(rounds + 1):  # round 0 warms up
                for k, (sample, _, _) in cases.items():
                    t0 = time.perf_counter()
                    sample(B, labels)
                    if r:
                        times[k].append((time.perf_counter() - t0) * 1e3)
            ratios = sorted(ras / par for par, ras in zip(times["PAR-4x"], times["raster"]))
            par_ms, ras_ms = statistics.median(times["PAR-4x"]), statistics.median(times["raster"])
            rows.append(dict(B=B, mode="fast" if fast else "parity", par_ms=par_ms, raster_ms=ras_ms,
                             ratio=ras_ms / par_ms, ratio_p20=ratios[len(ratios) // 5],
                             ratio_p50=statistics.median(ratios), ratio_p80=ratios[4 * len(ratios) // 5],
                             rounds=rounds))
            print(f"# PAR-4x vs raster B={B}: {rows[-1]['ratio']:.2f}x", flush=True)
    return rows, trained


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1, 4, 16 and 2 repeats")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 4 16 64, quick 1 4 16)")
    parser.add_argument("--repeats", type=int, help="timed calls per case (default 2 quick, 7 full)")
    parser.add_argument("--par-rounds", type=int, default=0,
                        help="only PAR-4x against raster, in this many interleaved rounds per batch size")
    parser.add_argument("--fast", action="store_true", help="with --par-rounds: PARSampler's fast mode")
    parser.add_argument("--out", help="JSON file (default: bench_results/batch-<date>.json)")
    args = parser.parse_args()
    if args.par_rounds < 0 or (args.fast and not args.par_rounds):
        parser.error("--par-rounds must be a positive count of rounds, and --fast needs it")
    if args.par_rounds:
        header = machine_header()
        rows, trained = par_vs_raster(args.batches or [1, 2, 4, 8], args.par_rounds, args.fast)
        header.update(models="digits, bundled weights" if trained else "digits architectures, random weights", cfg=CFG)
        print_header(f"PAR-4x against raster decoding, interleaved rounds (sampling + VQ decode), {header['models']}",
                     header)
        print_table(rows, ["B", "mode", "par_ms", "raster_ms", "ratio", "ratio_p20", "ratio_p50", "ratio_p80",
                           "rounds"])
        print("wrote", write_json("batch-par", header, rows, args.out))
        return
    batches = args.batches or ([1, 4, 16] if args.quick else [1, 4, 16, 64])
    repeats = args.repeats or (2 if args.quick else 7)
    header = machine_header()
    rows, trained = run(batches, repeats)
    header.update(models="digits, bundled weights" if trained else "digits architectures, random weights", cfg=CFG)
    print_header(f"images/s against batch size, {header['models']}", header)
    print_table(rows, ["sampler", "B", "passes", "ms", "p20_ms", "p80_ms", "img_s", "kv_KiB", "repeats"])
    print("wrote", write_json("batch", header, rows, args.out))


if __name__ == "__main__":
    main()
