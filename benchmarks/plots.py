"""PNG plots of a ``run_all`` report (matplotlib, the optional extra: ``pip install 'varcore[plots]'``).

    python benchmarks/plots.py bench_results/run_all-<date>.json [MORE.json ...] [--out docs/bench]
    varcore eval --sweep --json > sweep.json && python benchmarks/plots.py --sweep sweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PLOTS_EXTRA_HINT = "the benchmark plots need matplotlib: pip install 'varcore[plots]'"


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when a plot is drawn."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(PLOTS_EXTRA_HINT) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(data: dict, name: str) -> list:
    res = data.get("results", {}).get(name, {})
    return [r for r in res.get("json", {}).get("rows", []) if isinstance(r, dict)] if res.get("status") == "ok" else []


def _caption(data: dict) -> str:
    h = data.get("header")
    if not h:  # figures given without a run_all report (e.g. --sweep alone)
        return ""
    load = h.get("load_average_start", [None])[0]
    return (f"{h['cpu']}, {h['torch_threads']} threads, torch {h['torch']}, commit {h['commit']}, {h['date']}"
            + (f", load avg {load:.1f} on {h['cores']} cores (shared machine)" if load is not None else ""))


def _save(fig, data, path: Path) -> Path:
    fig.text(0.01, 0.005, _caption(data), fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def speedups(data: dict) -> list:
    """(label, speed-up over the reference measured in the same run) for every kernel case and the samplers."""
    out = [(f"par_order {r['case']}", r["speedup"]) for r in _rows(data, "par_order")]
    out += [(f"quant {r['case']}", r["speedup"]) for r in _rows(data, "quant")]
    out += [(f"attention L={r['L']} {r['mode']} vs SDPA", 1 / r["time_vs_sdpa"])
            for r in _rows(data, "attention") if r.get("impl") == "kernel"]
    sampler = _rows(data, "sampler")
    for r in sampler:
        base = next((b for b in sampler if b.get("B") == r.get("B") and b.get("path") == "drop-in float32"), None)
        if r.get("ms") and base and base.get("ms") and r["path"] != base["path"]:
            out.append((f"VAR sampler {r['path']} B={r['B']} vs drop-in", base["ms"] / r["ms"]))
    out += [(f"CoDe {r['config']} vs drafter alone", r["speedup"]) for r in _rows(data, "code")
            if r.get("config", "").startswith("CoDe")]
    out += [(f"accel {r['family']} {r['case']} vs {_accel_baseline(data, r['family'])}", r["speedup"])
            for r in _rows(data, "accel") if r.get("speedup") and r["speedup"] != 1]
    for r in _rows(data, "par"):  # older JSON: "speedup"; newer: "vs_raster" per mode (parity / fast)
        ratio = r.get("vs_raster", r.get("speedup"))
        if r.get("schedule") != "raster" and ratio:
            out.append((f"PAR {r.get('mode', '')} {r['schedule']} {r['grid']} B={r['batch']} vs raster", ratio))
    return out


def plot_speedups(data, out: Path):
    items = speedups(data)
    if not items:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(items) + 1.2))
    labels, values = zip(*items)
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(items)), values, color=colors)
    ax.set_yticks(range(len(items)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xlabel("speed-up over the baseline in the same run (log)")
    ax.set_title("Kernels and samplers: speed-up per op")
    return _save(fig, data, out / "speedup.png")


def plot_batch(data, out: Path):
    rows = _rows(data, "batch")
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["B"], r["img_s"]) for r in rows if r["sampler"] == name)
        style = "--" if name.startswith("CoDe") else "-"
        ax.plot(*zip(*pts), style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (tokens + decode)")
    models = data["results"]["batch"]["json"]["header"].get("models", "")
    ax.set_title(f"Images/s against batch size ({models})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, data, out / "images_per_s.png")


def plot_code_quality(data, out: Path):
    rows = data.get("code_quality")
    if not rows:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, label in ((a1, "class_consistency", "class consistency"), (a2, "frechet", "Fréchet distance")):
        xs, ys = [r["images_per_s"] for r in rows], [r[key] for r in rows]
        ax.plot(xs, ys, "o-")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["decoding"].replace("VAR (drafter alone)", "drafter"), (x, y), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("images/s")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("CoDe on the digits task: speed against quality over N (drafter draws N scales)", fontsize=9)
    return _save(fig, data, out / "code_speed_quality.png")


def _accel_baseline(data: dict, family: str) -> str:
    return data["results"]["accel"]["json"]["header"]["families"].get(family, {}).get("baseline", "baseline")


def plot_accel_sweep(data, out: Path):
    """The accelerator sweep (``varcore eval --sweep`` rows, ``accel_sweep``): one point per configuration at its
    images/s ratio to its baseline (measured in the same run) and its class consistency; the baselines as hollow
    markers at ratio 1."""
    rows = data.get("accel_sweep")
    if not rows:
        return None
    plt = _pyplot()
    fig, (ax, side) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": (3, 2)})
    side.axis("off")
    bases = {r["baseline"]["model"]: r["baseline"]["class_consistency"] for r in rows}
    colors = {name: f"C{i}" for i, name in enumerate(bases)}
    for name, cc in bases.items():
        ax.scatter([1.0], [cc], facecolors="none", edgecolors=colors[name], s=60, label=f"baseline {name}")
    key = []  # points carry numbers, the configurations are listed beside the axes (long labels overlap)
    for i, r in enumerate(rows, 1):
        x, y = r["vs_baseline"]["images_per_s"], r["class_consistency"]
        ax.scatter([x], [y], color=colors[r["baseline"]["model"]], s=30)
        ax.annotate(str(i), (x, y), fontsize=7, textcoords="offset points", xytext=(4, 3))
        model, _, rest = r["config"].partition(":")  # the baseline is the colour: leave out vs=
        options = [o for o in rest.split(",") if o and not o.startswith("vs=")]
        key.append(f"{i:>2}  {model}" + (": " + ", ".join(options) if options else ""))
    side.text(0, 1, "\n".join(key), fontsize=7, family="monospace", va="top", transform=side.transAxes, wrap=True)
    ax.axvline(1, color="k", lw=0.6)
    ax.set_xlabel("images/s relative to the baseline (same run, interleaved batches)")
    ax.set_ylabel("class consistency")
    ax.set_title("Training-free accelerators on the digits models: speed against quality", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, data, out / "accel_speed_quality.png")


def plot_kv_cache(data, out: Path):
    """One panel per source: the digits samplers at their largest batch (bench_batch), VAR's official concat cache
    against the static caches (bench_sampler), CoDe against the drafter alone (bench_code)."""
    panels = []
    rows = _rows(data, "batch")
    if rows:
        B = max(r["B"] for r in rows)
        sel = [r for r in rows if r["B"] == B]
        panels.append(([r["sampler"] for r in sel], [r["kv_KiB"] for r in sel], f"KV cache at batch {B} (KiB)",
                       "digits models: KV cache per sampler"))
    sampler = [r for r in _rows(data, "sampler") if r.get("kv_MiB")]
    if sampler:
        B = max(r["B"] for r in sampler)
        sel = [r for r in sampler if r["B"] == B]
        shape = data["results"]["sampler"]["json"]["header"].get("shape", "")
        panels.append(([r["path"] for r in sel], [r["kv_MiB"] for r in sel], f"KV cache at batch {B} (MiB)",
                       f"VAR {shape}: official concat cache vs static cache"))
    code = [r for r in _rows(data, "code") if r.get("kv_MiB")]
    if code:
        panels.append(([r["config"] for r in code], [r["kv_MiB"] for r in code], "peak KV cache (MiB)",
                       "CoDe: drafter + refiner vs the drafter alone"))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (labels, values, ylabel, title) in zip(axes[0], panels):
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), labels, rotation=30, fontsize=7, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
    return _save(fig, data, out / "kv_cache.png")


def plot_shares(data, out: Path):
    rows = data.get("ceiling_shares")
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["share_pct"] for r in rows],
            color=["tab:purple" if r["unit"] == "GB/s" else "tab:blue" for r in rows])
    ax.set_yticks(range(len(rows)), [f"{r['benchmark']} {r['case']} ({r['ceiling']})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(100, color="k", lw=0.8)
    c = data["ceilings"]
    ax.set_xlabel(f"% of this machine's ceiling (fp32 GEMM {c['fp32_gflops']:.0f}, bf16 GEMM {c['bf16_gflops']:.0f} "
                  f"GFLOP/s, memory {c['mem_gbs']:.1f} GB/s)", fontsize=8)
    ax.set_title("Share of the measured ceiling per kernel")
    return _save(fig, data, out / "ceiling_share.png")


def draw_all(data: dict, out: Path) -> list:
    """Every plot that ``data`` has figures for, as PNG files in ``out``; ImportError naming the extra without
    matplotlib."""
    _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = [f(data, out) for f in (plot_speedups, plot_batch, plot_code_quality, plot_accel_sweep, plot_kv_cache,
                                    plot_shares)]
    return [p for p in paths if p is not None]


def merge(reports: list) -> dict:
    """One report from several ``run_all`` runs (for example ``--only`` runs): the scripts' results and the
    top-level figures of later reports win; the header (the caption) is the first report's."""
    data = dict(reports[0])
    data["results"] = dict(data.get("results", {}))
    for other in reports[1:]:
        data["results"].update(other.get("results", {}))
        data.update({k: v for k, v in other.items() if k not in ("header", "results") and v})
    return data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="*", help="run_all JSON files (several are merged, later ones win)")
    parser.add_argument("--script", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                        help="add a benchmark script's own JSON as the result NAME (e.g. batch "
                             "bench_results/batch-<date>.json), for a script run outside run_all")
    parser.add_argument("--sweep", metavar="JSON", help="the rows of varcore eval --sweep --json (or --accel) as the "
                                                        "accelerator sweep")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench"))
    args = parser.parse_args()
    if not (args.reports or args.script or args.sweep):
        parser.error("give a run_all report, --script or --sweep")
    reports = [json.loads(Path(r).read_text()) for r in args.reports]
    reports += [{"results": {name: {"status": "ok", "json": json.loads(Path(path).read_text())}}}
                for name, path in args.script]
    if args.sweep:
        reports.append({"accel_sweep": json.loads(Path(args.sweep).read_text())})
    data = merge(reports)
    try:
        paths = draw_all(data, Path(args.out))
    except ImportError as e:
        print(f"plots.py: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print("wrote", p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
