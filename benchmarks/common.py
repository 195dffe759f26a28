"""Shared timing helper for varcore's benchmarks.

Every figure is a median over repeats after warm-up, with the 20th and 80th percentiles, and every run records
the machine, torch and the git commit, so that the JSON files can be compared across runs. Ratios are only
ever taken between timings measured in the same run (this machine is shared and noisy).

With ``VARCORE_BENCH_KEEP_FREED_MEMORY=1`` importing this module calls :func:`varcore.memory.keep_freed_memory`
(glibc keeps freed memory instead of mapping it afresh for every large tensor); every path a benchmark compares
runs in the same process, so all of them get it, and the JSON header records it. It is off by default because
the process then keeps every heap hole it ever made: ``bench_sampler.py``'s batch-32 runs grew to 24 GB and were
killed with it (see :mod:`varcore.memory`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from varcore.memory import keep_freed_memory

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench_results"
KEEP_FREED_MEMORY = os.environ.get("VARCORE_BENCH_KEEP_FREED_MEMORY") == "1" and keep_freed_memory()


@dataclass
class Timing:
    name: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    peak_bytes: int | None = None  # peak memory allocated by one call (tensors only)
    extra: dict = field(default_factory=dict)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def peak_memory(fn, device="cpu") -> int | None:
    """Peak bytes of tensor memory allocated while ``fn()`` runs, over what was allocated before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # On the CPU, replay the profiler's allocation events in time order and take the high-water mark.
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except (AttributeError, RuntimeError):
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def bench(name, fn, *, device="cpu", warmup=3, repeats=20, min_time_s=0.0, memory=True, **extra) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (more until
    ``min_time_s`` has passed). Returns medians and percentiles in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(name, statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8), len(times),
                  peak_memory(fn, device) if memory else None, extra)


def bench_interleaved(fns: dict, *, device="cpu", warmup=1, repeats=7, memory=True) -> dict:
    """Time several ``name -> fn`` in turns (one call of each per round, the order rotating between rounds), so
    that load from other processes falls on all of them alike and their ratios stay meaningful on a busy machine.
    Returns ``name -> Timing``."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: Timing(name, statistics.median(ts), _percentile(ts, 0.2), _percentile(ts, 0.8), len(ts),
                         peak_memory(fns[name], device) if memory else None)
            for name, ts in times.items()}


def _git_commit():
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "") if out.returncode == 0 else None
    except OSError:
        return None


def machine_header() -> dict:
    import varcore

    info = varcore.info(print_report=False)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "varcore_compiled": info["compiled"],
        "keep_freed_memory": KEEP_FREED_MEMORY,
    }


def print_header(title: str, header: dict):
    print(f"# {title}")
    print(f"# {header['date']}  commit {header['commit']}  {header['cpu']} ({header['cores']} cores, "
          f"{header['torch_threads']} torch threads)  gpu={header['gpu']}  torch {header['torch']}")


def print_table(rows: list[dict], columns: list[str]):
    """Print rows (dicts) as an aligned text table with the given columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(name: str, header: dict, rows: list, out: str | None = None) -> Path:
    """Write ``{"header": ..., "rows": [...]}`` to ``out`` or ``bench_results/<name>-<date>.json``."""
    path = Path(out) if out else RESULTS_DIR / f"{name}-{header['date'].replace(':', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) if isinstance(r, Timing) else r for r in rows]
    path.write_text(json.dumps({"benchmark": name, "header": header, "rows": rows}, indent=2))
    return path
