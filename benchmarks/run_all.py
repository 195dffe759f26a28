"""Run every kernel and sampler benchmark, measure this machine's ceilings, and write one JSON and the plots.

    python benchmarks/run_all.py --quick     # a few minutes: small shapes, few repeats
    python benchmarks/run_all.py             # the scripts' full sizes (tens of minutes on 2 cores)
    varcore bench [--quick]                  # the same

Each benchmark script runs in its own process at the chosen size (``--quick`` passed when it has one), writes its
JSON into the run's folder, and a failure or time-out is recorded, not fatal. Then, in this process:

* **ceilings** (:mod:`costs`): fp32/bf16 GEMM GFLOP/s and memory GB/s measured now, each kernel's achieved
  rate as a share of its ceiling (work models in :func:`ceiling_shares`), and the GPU floor per image;
* **quality** of CoDe over N (and VAR alone) on the digits task, with the quality harness of ``varcore eval``
  (:mod:`varcore.digits.quality`), when the bundled weights are installed;
* **sweep**: the training-free accelerators on the digits models, the fixed configurations of ``varcore eval
  --sweep`` (:data:`varcore.digits.evaluate.SWEEP`), each against its baseline in interleaved batches: images/s
  ratio, forward passes, KV bytes, class consistency and Fréchet distance (the speed-quality plot);
* one JSON ``bench_results/run_all-<date>.json`` (machine, load average, torch, commit, every figure), and PNG plots
  (``--plots``, default ``docs/bench``; needs matplotlib: ``pip install 'varcore[plots]'``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_header, print_table, write_json  # noqa: E402

# script -> extra arguments in quick mode (beyond --quick) and in full mode
SCRIPTS = {
    "ceilings": None,  # run in-process
    "par_order": ([], []),
    "linear": ([], []),
    "quant": ([], []),
    "attention": ([], []),
    "sampler": (["--batches", "2", "--repeats", "1"], []),
    "par": (["--grids", "16", "--batches", "4", "--repeats", "1", "--modes", "fast"], ["--vq"]),
    "code": (["--shape", "quick", "--draft-steps", "8", "--repeats", "1"], []),
    "batch": ([], []),
    "accel": ([], []),
}
# per script; the full bench_par (GPT-B, both grids and batches, VQ-16 decode of every call) took 53 min idle here
TIMEOUT_S = {"quick": 600, "full": 7200}


# ---------------------------------------------------------------------------------------------- running scripts
def _script_path(name: str) -> Path:
    return HERE / f"bench_{name}.py"


def _options(path: Path) -> str:
    """The script's --help text (to see which of --quick / --out / --json / --threads it takes)."""
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    return out.stdout


def run_script(name: str, quick: bool, out_dir: Path, threads: int | None) -> dict:
    """Run ``bench_<name>.py`` in a subprocess; returns ``{"status", "seconds", "json" | "error"}``."""
    path = _script_path(name)
    if not path.is_file():
        return {"status": "missing", "error": f"{path.name} does not exist"}
    helptext = _options(path)
    quick_args, full_args = SCRIPTS[name]
    args = [sys.executable, str(path)] + (quick_args if quick else full_args)
    if quick and "--quick" in helptext:
        args.append("--quick")
    if threads and "--threads" in helptext:
        args += ["--threads", str(threads)]
    out = out_dir / f"{name}.json"
    flag = "--out" if "--out" in helptext else "--json" if "--json" in helptext else None
    if flag:
        args += [flag, str(out)]
    env = dict(os.environ)
    if threads:  # for scripts without --threads
        env["OMP_NUM_THREADS"] = str(threads)
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    print(f"## {' '.join(a if a != sys.executable else 'python' for a in args)}", flush=True)
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=HERE.parent,
                              timeout=TIMEOUT_S["quick" if quick else "full"])
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - start}
    seconds, cpu = time.perf_counter() - start, _children_cpu_s() - cpu_start
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"status": "failed", "seconds": seconds, "cpu_seconds": cpu, "error": "\n".join(tail)}
    return {"status": "ok", "seconds": seconds, "cpu_seconds": cpu, "json": json.loads(out.read_text())}


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of finished child processes: the work a script did, whatever the load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------- ceiling shares
def _attention_flops(L: int, mode: str) -> float:
    """Minimum matmul FLOPs of block-causal attention at bench_attention's shape (B=4, H=16, D=64): forward
    QK^T and PV over the visible pairs; backward four more such products (dV, dP, dQ, dK)."""
    from bench_attention import SCHEDULES

    pns = SCHEDULES[L]
    pairs, end = 0, 0
    for pn in pns:
        end += pn * pn
        pairs += pn * pn * end
    forward = 2 * 2 * 4 * 16 * 64 * pairs
    return forward * (3 if mode == "forward+backward" else 1)


def _quant_flops(case: str) -> float | None:
    """FLOPs of one quantiser call at bench_quant's shapes (V=4096, Cvae=32, 16x16 latent, the 256 px schedule):
    nearest code 2 N V C; msrq_encode per scale and image the nearest code of pn^2 rows and a 3x3 phi convolution
    at 16x16; upsample_sum the phi convolutions only."""
    from bench_quant import CVAE, PATCH_NUMS, V

    kind, arg = case.split(" ", 1)
    n = int(arg.split("=")[1])
    phi = 2 * 9 * CVAE * CVAE * PATCH_NUMS[-1] ** 2
    if kind == "nearest_code":
        return 2 * n * V * CVAE
    if kind == "msrq_encode":
        return n * sum(2 * pn * pn * V * CVAE + phi for pn in PATCH_NUMS)
    if kind == "upsample_sum":
        return n * len(PATCH_NUMS) * phi
    return None


def _gpt_flops_per_token(n_layer: int, dim: int, vocab: int) -> float:
    """Linear-layer FLOPs of one generated token of a LlamaGen GPT (both CFG halves; attention left out)."""
    from varcore.models.gpt import ModelArgs

    hidden = ModelArgs(dim=dim, n_layer=n_layer, n_head=max(1, dim // 64), vocab_size=vocab).ffn_hidden
    return 2 * 2 * (n_layer * (4 * dim * dim + 3 * dim * hidden) + dim * vocab)


def ceiling_shares(results: dict, ceil: dict) -> list:
    """One row per kernel (and sampler) measurement: achieved rate, the ceiling it is compared with, and the share.
    Memory-bound ops (PAR order) against the measured bandwidth, compute-bound ones against the GEMM throughput of
    their dtype."""
    rows = []

    def add(bench, case, rate, unit, ceiling_name):
        ceiling = ceil["mem_gbs"] if unit == "GB/s" else ceil[ceiling_name]
        rows.append({"benchmark": bench, "case": case, "achieved": rate, "unit": unit,
                     "ceiling": ceiling_name, "ceiling_value": ceiling, "share_pct": 100 * rate / ceiling})

    for r in _rows(results, "par_order"):
        add("par_order", r["case"], r["kernel_GB/s"], "GB/s", "mem_gbs")
    for r in _rows(results, "quant"):
        flops = _quant_flops(r["case"])
        if flops:
            add("quant", r["case"], flops / r["kernel_ms"] / 1e6, "GFLOP/s", "fp32_gflops")
    att_dtype = _header(results, "attention").get("dtype", "float32")
    for r in _rows(results, "attention"):
        if r.get("impl") == "kernel":
            add("attention", f"L={r['L']} {r['mode']}", _attention_flops(r["L"], r["mode"]) / r["median_ms"] / 1e6,
                "GFLOP/s", "bf16_gflops" if att_dtype == "bfloat16" else "fp32_gflops")
    for r in _rows(results, "sampler"):
        if r.get("GFLOP_s"):
            add("sampler", f"{r['path']} B={r['B']}", r["GFLOP_s"], "GFLOP/s",
                "bf16_gflops" if "bfloat16" in r["path"] else "fp32_gflops")
    model = _header(results, "par").get("model")
    if model:
        per_token = _gpt_flops_per_token(model["n_layer"], model["dim"], model["vocab"])
        for r in _rows(results, "par"):
            if "tokens/s" in r:
                add("par", f"{r.get('mode', '')} {r['schedule']} {r['grid']} B={r['batch']}",
                    r["tokens/s"] * per_token / 1e9, "GFLOP/s", "fp32_gflops")
    return rows


def _rows(results: dict, name: str) -> list:
    res = results.get(name, {})
    return [r for r in res.get("json", {}).get("rows", []) if isinstance(r, dict)] if res.get("status") == "ok" else []


def _header(results: dict, name: str) -> dict:
    res = results.get(name, {})
    return res.get("json", {}).get("header", {}) if res.get("status") == "ok" else {}


# ---------------------------------------------------------------------------------------------- quality
def code_quality(n_images: int, seed: int = 0) -> list | None:
    """CoDe over N on the digits task (drafter alone as N = SN): images/s, class consistency and Fréchet distance
    of ``n_images`` samples (CFG 1.5), with ``varcore eval``'s harness. None when the weights are not installed."""
    from varcore.digits import quality, recipe

    parts = ("vqvae", "var-drafter", "var-refiner", "classifier")
    if not all(recipe.weights_path(p).is_file() for p in parts):
        return None
    from varcore.sampling.code import CoDeSampler
    from varcore.sampling.var import VARSampler

    vae = recipe.load_weights("vqvae")
    drafter, refiner = (recipe.load_weights(p, vae=vae) for p in ("var-drafter", "var-refiner"))
    classifier = quality.load_classifier()
    ref = quality.reference_features(classifier)
    labels = torch.arange(n_images) % 10
    SN = len(drafter.patch_nums)
    configs = {N: CoDeSampler(drafter, refiner, N, vae) for N in range(1, SN)}
    configs[SN] = VARSampler(drafter, vae)
    rows = []
    with torch.inference_mode():
        for N, sampler in configs.items():
            sampler.sample(8, labels[:8], g_seed=seed, cfg=1.5)  # warm-up
            t0 = time.perf_counter()
            images = sampler.sample(n_images, labels, g_seed=seed, cfg=1.5)
            seconds = time.perf_counter() - t0
            rows.append({"decoding": "VAR (drafter alone)" if N == SN else f"CoDe N={N}", "N": N,
                         "images_per_s": n_images / seconds,
                         "class_consistency": quality.class_consistency(classifier, images, labels),
                         "frechet": quality.frechet_distance(quality.classifier_features(classifier, images), ref)})
    return rows


def accel_sweep(per_class: int, seed: int = 0) -> list | None:
    """The rows of ``varcore eval --sweep`` (``per_class`` images of each class per configuration), or None when
    the bundled weights are not installed."""
    from varcore.digits import BUNDLED, recipe
    from varcore.digits.accel import parse_config
    from varcore.digits.evaluate import SWEEP, evaluate_accel

    names = {n for c in map(parse_config, SWEEP) for n in (c.model, c.baseline)}
    parts = {p for name in names for p in BUNDLED[name].parts} | {"classifier"}
    if not all(recipe.weights_path(p).is_file() for p in parts):
        return None

    return evaluate_accel(SWEEP, per_class=per_class, batch_size=min(100, 10 * per_class), seed=seed,
                          progress=False)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS) + ["quality", "sweep"],
                        help="run only these parts")
    parser.add_argument("--threads", type=int, help="torch threads for every benchmark (default: torch's)")
    parser.add_argument("--quality-images", type=int, default=0,
                        help="images per CoDe configuration for the speed-quality curve (default 200, quick 100)")
    parser.add_argument("--sweep-per-class", type=int, default=0,
                        help="images per class and configuration of the accelerator sweep (default 50, quick 10)")
    parser.add_argument("--plots", default=str(HERE.parent / "docs" / "bench"),
                        help="folder for the PNG plots (default docs/bench)")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    parser.add_argument("--out", help="JSON file (default: bench_results/run_all-<date>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from costs import FLOOR_COLUMNS, gpu_floors, measure_ceilings

    size = "quick" if args.quick else "full"
    parts = args.only or list(SCRIPTS) + ["quality", "sweep"]
    header = machine_header()
    header.update(size=size, load_average_start=os.getloadavg())
    print(f"# run_all ({size}) {header['date']} commit {header['commit']}, load average "
          f"{header['load_average_start'][0]:.1f} on {header['cores']} cores", flush=True)
    start = time.perf_counter()
    report = {"size": size, "results": {}}
    if "ceilings" in parts:
        report["ceilings"] = measure_ceilings(args.quick)
        print("## ceilings: fp32 {fp32_gflops:.0f} GFLOP/s, bf16 {bf16_gflops:.0f} GFLOP/s, memory {mem_gbs:.1f} GB/s"
              .format(**report["ceilings"]), flush=True)
        report["gpu_floors"] = gpu_floors()
    with tempfile.TemporaryDirectory() as tmp:
        for name in parts:
            if name in ("ceilings", "quality", "sweep"):
                continue
            res = run_script(name, args.quick, Path(tmp), args.threads)
            report["results"][name] = res
            print(f"## {name}: {res['status']} ({res.get('seconds', 0):.0f} s, {res.get('cpu_seconds', 0):.0f} CPU s)"
                  + (f"\n{res['error']}" if res.get("error") else ""), flush=True)
    if "ceilings" in report:
        report["ceiling_shares"] = ceiling_shares(report["results"], report["ceilings"])
    if "quality" in parts:
        n = args.quality_images or (100 if args.quick else 200)
        report["code_quality"] = code_quality(n)
        if report["code_quality"] is None:
            print("## quality: skipped (the bundled digits weights are not installed)")
    if "sweep" in parts:
        report["accel_sweep"] = accel_sweep(args.sweep_per_class or (10 if args.quick else 50))
        if report["accel_sweep"] is None:
            print("## sweep: skipped (the bundled digits weights are not installed)")
    header.update(load_average_end=os.getloadavg(), seconds=time.perf_counter() - start)
    path = write_json("run_all", header, [], args.out)
    data = json.loads(path.read_text())
    data.update(report)
    path.write_text(json.dumps(data, indent=2))

    print()
    print_summary(report, FLOOR_COLUMNS)
    if not args.no_plots:
        from plots import draw_all

        try:
            for p in draw_all(data, Path(args.plots)):
                print("plot", p)
        except ImportError as e:
            print(f"# no plots: {e}")
    print(f"wrote {path} ({header['seconds'] / 60:.1f} min, load average {header['load_average_start'][0]:.1f} -> "
          f"{header['load_average_end'][0]:.1f})")
    return 0


def print_summary(report: dict, floor_columns: list):
    if "ceilings" in report:
        c = report["ceilings"]
        print(f"# ceilings: fp32 GEMM {c['fp32_gflops']:.0f} GFLOP/s, bf16 GEMM {c['bf16_gflops']:.0f} GFLOP/s, "
              f"memory {c['mem_gbs']:.1f} GB/s")
        print_table(report["ceiling_shares"], ["benchmark", "case", "achieved", "unit", "ceiling", "share_pct"])
        print("\n# GPU floor per image (ms), CFG, dense bf16 peak; B = batch (bf16 weights read once per pass)")
        print_table(report["gpu_floors"], floor_columns)
    if report.get("code_quality"):
        print("\n# CoDe on the digits task")
        print_table(report["code_quality"], ["decoding", "N", "images_per_s", "class_consistency", "frechet"])
    if report.get("accel_sweep"):
        print("\n# training-free accelerators on the digits models (varcore eval --sweep)")
        print_table([{"config": r["config"], "baseline": r["baseline"]["model"], "passes": r["forward_passes"],
                      "kv_bytes": r["kv_bytes"], "images_per_s": r["images_per_s"],
                      "x_baseline": r["vs_baseline"]["images_per_s"], "class_consistency": r["class_consistency"],
                      "base_consistency": r["baseline"]["class_consistency"], "frechet": r["frechet"],
                      "base_frechet": r["baseline"]["frechet"]} for r in report["accel_sweep"]],
                    ["config", "baseline", "passes", "kv_bytes", "images_per_s", "x_baseline", "class_consistency",
                     "base_consistency", "frechet", "base_frechet"])
    if not report["results"]:
        return
    print("\n# scripts")
    print_table([{"script": k, "status": v["status"], "seconds": v.get("seconds"), "cpu_seconds": v.get("cpu_seconds")}
                 for k, v in report["results"].items()], ["script", "status", "seconds", "cpu_seconds"])


if __name__ == "__main__":
    raise SystemExit(main())
