"""VAR sampling on a GPU: the drop-in ``autoregressive_infer_cfg`` against ``VARSampler`` in bfloat16 with CUDA graphs
and ``torch.compile`` on and off (images/s), and the float32 token check of the two.

    python benchmarks/bench_gpu_sampler.py [--device cuda|cpu] [--shapes d16 d30] [--batches 8 64] [--repeats 3]
                                           [--budget-s 300] [--no-compile] [--json FILE] [--quick]

Random weights (the official initialisation) shaped like VAR-d16 and VAR-d30 at 256 px (V=4096, the real VQVAE
shape); ``--quick`` builds a depth-2 model on a 4-scale 64 px pyramid at batch 2 instead, a functional check that
runs on the CPU in seconds. Sampling uses the FID protocol (cfg 1.5, top-k 900, top-p 0.96), every call decodes
its images, and each shape and batch size runs five configurations:

* ``drop-in``: ``var.autoregressive_infer_cfg`` under ``torch.autocast(device, bfloat16)``, as the official
  scripts call it;
* ``fast``, ``fast+graphs``, ``fast+compile``, ``fast+graphs+compile``: ``VARSampler(var, dtype=torch.bfloat16)``
  with ``cuda_graphs`` and ``compile`` off or on.

Each configuration gets two untimed warm-up calls (the first compiles or captures the graphs; the second is the
cost of one timed call), then ``--repeats`` rounds time one call of every configuration in turn
(``common.bench_interleaved``, synchronised around every call); images/s is the batch over the median. The runs
go in two passes over the shapes and batch sizes: first ``drop-in``, ``fast`` and ``fast+graphs`` interleaved,
then ``fast`` again with the two compiled configurations, so that compiling (minutes, and not predictable before
it has been measured once) cannot crowd out the other measurements. Every row has its time against ``fast`` of
the same rounds (``vs_fast``); the first pass's rows also against the drop-in (``vs_dropin``). The tokens of every
configuration are compared with those of ``fast`` (the drop-in under autocast and compiled kernels round
differently, so in bfloat16 they may differ in places).

The float32 check runs first, on the first shape at batch 8 (``--quick``: at its batch): the drop-in without
autocast and ``VARSampler`` in float32 (and, on CUDA, with CUDA graphs) run the same arithmetic and must draw
identical tokens; a difference is recorded as a failure.

What would overrun ``--budget-s`` is skipped, saying so: warm-ups and rounds are predicted from the configuration's
last measurement (scaled by FLOPs, and compile time by depth); the first compile, whose time nothing predicts, is
tried only while at least a quarter of the budget is left, and a run still busy 5 s after the budget is over
writes what it has, with a row saying where it stopped, and exits. A CUDA-graph configuration keeps its KV cache
between calls; it is skipped when that cache and the other configurations' peak would not fit in the free GPU
memory. A configuration that fails (an exception, a graph capture that falls back to the eager step) is recorded
with the reason, and the rest still run. The JSON is rewritten after every shape and batch size.
"""
import argparse
import gc
import os
import threading
import time
import warnings

import torch

from common import bench_interleaved, machine_header, print_header, print_table, write_json
from costs import flops_per_image
from varcore.models import PATCH_NUMS, build_vae_var
from varcore.sampling.var import VARSampler

SHAPES = {
    "d16": dict(depth=16, V=4096, ch=160, patch_nums=PATCH_NUMS[256]),
    "d30": dict(depth=30, V=4096, ch=160, patch_nums=PATCH_NUMS[256]),
    "tiny": dict(depth=2, V=4096, ch=32, patch_nums=(1, 2, 3, 4)),
}
SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)  # the official FID protocol
CONFIGS = ("drop-in", "fast", "fast+graphs", "fast+compile", "fast+graphs+compile")
PASSES = {"eager": ("drop-in", "fast", "fast+graphs"), "compile": ("fast", "fast+compile", "fast+graphs+compile")}
GRACE_S = 5.0  # past the budget, a run that is still busy (a compile) writes what it has and exits
CHECK_BATCH = 8
FIRST_COMPILE_SHARE = 0.25  # an unpredictable first compile is tried only with this share of the budget left


PROXY = {"fast+graphs": "fast", "fast+graphs+compile": "fast+compile"}  # predicts a config never measured yet


class Budget:
    """Seconds left of ``--budget-s`` and the cost predictions taken from earlier measurements."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()
        self.last = {}  # config -> (work = FLOPs x batch, depth, first call s, one call s)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def record(self, config, work, depth, first_s, call_s):
        self.last[config] = (work, depth, first_s, call_s)

    def predict(self, config, work, depth):
        """(first call s, one call s) of ``config`` at ``work`` FLOPs and ``depth`` from its last measurement (or
        its proxy's), None when neither was measured: calls scale with the FLOPs, the first call's overhead
        (compile, capture) with the depth."""
        last = self.last.get(config) or self.last.get(PROXY.get(config))
        if last is None:
            return None
        w0, d0, first0, call0 = last
        call = call0 * work / w0
        return call + max(0.0, first0 - call0) * depth / d0, call


class Watchdog:
    """Ends the run ``GRACE_S`` after the budget: writes the rows so far and a row naming what was running, then
    exits (a compile cannot be interrupted from Python)."""

    def __init__(self, budget: Budget, save):
        self.activity, self.save = None, save
        self.timer = threading.Timer(max(0.0, budget.left()) + GRACE_S, self.expire)
        self.timer.daemon = True
        self.timer.start()

    def expire(self):
        print(f"# the time budget ran out during {self.activity}: stopping", flush=True)
        self.save(dict(self.activity or {}, note="skipped: the time budget ran out while this ran (the run "
                                                 "stopped here)"))
        os._exit(0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _equal_fraction(a, b) -> float:
    return sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]


def _free_bytes(device) -> int:
    """GPU memory this process could still allocate: free on the card plus its cache's unused blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_call(config, var, B, device, dtype=torch.bfloat16):
    """(sampler or None, f() -> tokens) for one configuration; ``dtype`` float32 runs the drop-in without autocast."""
    labels = torch.arange(B, device=device) % 1000
    if config == "drop-in":
        def call():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
                return var.autoregressive_infer_cfg(B, labels, g_seed=0, return_idx_Bl=True, **SAMPLING)[1]
        return None, call
    sampler = VARSampler(var, dtype=dtype, cuda_graphs="graphs" in config, compile="compile" in config)
    return sampler, lambda: sampler.sample(B, labels, g_seed=0, output="both", **SAMPLING)[1]


def skip_reason(config, device, args):
    if "graphs" in config and device.type != "cuda":
        return "skipped: cuda_graphs needs a CUDA device"
    if "compile" in config and args.no_compile:
        return "skipped: --no-compile"
    return None


def warm_up(fn, device):
    """Two untimed calls; returns (first call s, second call s, tokens, peak and resident bytes, notes)."""
    notes = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            t0 = time.perf_counter()
            tokens = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    notes += sorted({str(w.message).splitlines()[0][:200] for w in caught})
    peak = resident = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
        resident = torch.cuda.memory_allocated(device) - before
    return times[0], times[1], tokens, peak, resident, notes


def float32_check(shape, var, B, device):
    """The drop-in without autocast against VARSampler float32 (and with CUDA graphs on CUDA): rows of the
    fraction of equal tokens; the float32 paths run the same arithmetic, so anything below 1 is a failure."""
    configs = ["drop-in", "fast"] + (["fast+graphs"] if device.type == "cuda" else [])
    tokens, rows = {}, []
    for config in configs:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sampler, fn = make_call(config, var, B, device, dtype=torch.float32)
                tokens[config] = [t.cpu() for t in fn()]
                if sampler is not None and "graphs" in config:  # a second call replays the captured graphs
                    tokens[config] = [t.cpu() for t in fn()]
        except Exception as err:  # noqa: BLE001 - recorded, and the other configurations still run
            rows.append(dict(check="float32 tokens", shape=shape, B=B, config=config,
                             note=f"failed: {_first_line(err)}"))
            continue
        finally:
            sampler = fn = None
            _release(device)
        row = dict(check="float32 tokens", shape=shape, B=B, config=config, dtype="float32",
                   seconds=time.perf_counter() - t0)
        if config != "drop-in" and "drop-in" in tokens:
            same = _equal_fraction(tokens[config], tokens["drop-in"])
            row.update(equal_to_dropin=same, note=None if same == 1 else "failed: tokens differ from the drop-in's")
        fell_back = [str(w.message).splitlines()[0] for w in caught if "eager step" in str(w.message)]
        if fell_back:
            row["note"] = f"failed: {fell_back[0][:200]}"
        rows.append(row)
    return rows


def run_group(shape, B, var, device, args, budget, pass_name, watchdog):
    """Warm up and time the configurations of pass ``pass_name`` at one shape and batch size; returns the rows."""
    depth = len(var.blocks)
    work = flops_per_image(var) * B
    rows, calls, samplers, state, skipped = [], {}, {}, {}, {}
    base = dict(shape=shape, B=B, dtype="bfloat16", **{"pass": pass_name})
    static = {config: skip_reason(config, device, args) for config in PASSES[pass_name]}
    if all(static[c] for c in PASSES[pass_name] if c != "fast"):  # nothing to set against the fast anchor
        return [dict(base, config=c, note=static[c]) for c in PASSES[pass_name] if c != "fast"]
    # in the compile pass the fast anchor comes last: it runs only when something compiled runs beside it
    order = sorted(PASSES[pass_name], key=lambda c: pass_name == "compile" and c == "fast")
    for config in order:
        reason = static[config]
        if pass_name == "compile" and config == "fast" and not state:
            reason = "skipped: no compiled configuration ran to set it against"
        predicted = budget.predict(config, work, depth)
        if reason is None and predicted is not None and sum(predicted) > budget.left():
            reason = (f"skipped: over the time budget (warm-up predicted at {sum(predicted):.0f} s, "
                      f"{budget.left():.0f} s left)")
        if reason is None and budget.left() <= 0:
            reason = f"skipped: the time budget is spent ({budget.left():.0f} s left)"
        if reason is None and predicted is None and "compile" in config \
                and budget.left() < FIRST_COMPILE_SHARE * budget.seconds:
            reason = f"skipped: no compile time measured yet and only {budget.left():.0f} s left"
        sampler = fn = None
        try:
            if reason is None:
                sampler, fn = make_call(config, var, B, device)
                if "graphs" in config and device.type == "cuda":
                    # its cache stays; each other configuration needs its peak over what it keeps (+10%)
                    transient = max(((s["peak"] or 0) - (s["resident"] or 0) for s in state.values()), default=0)
                    need = int(1.1 * (sampler.kv_cache_bytes(B) + transient))
                    free = _free_bytes(device)
                    if need > free:
                        reason = (f"skipped: its resident KV cache and the other configurations' peak need "
                                  f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            if reason is None:
                watchdog.activity = dict(base, config=config, stage="warm-up")
                first_s, call_s, tokens, peak, resident, notes = warm_up(fn, device)
        except torch.cuda.OutOfMemoryError as err:
            reason = f"skipped: out of GPU memory ({_first_line(err)[:160]})"
        except Exception as err:  # noqa: BLE001 - recorded, and the other configurations still run
            reason = f"failed: {_first_line(err)}"
        if reason:
            sampler = fn = None
            _release(device)
            skipped[config] = reason
            print(f"# {shape} B={B} {config}: {reason}", flush=True)
            continue
        if sampler is not None and "graphs" in config and not sampler.cuda_graphs:
            notes.insert(0, "failed: CUDA graph capture fell back to the eager step (timed so)")
        budget.record(config, work, depth, first_s, call_s)
        calls[config], samplers[config] = fn, sampler
        state[config] = dict(first_s=first_s, call_s=call_s, tokens=[t.cpu() for t in tokens], peak=peak,
                             resident=resident, notes=notes)
        print(f"# {shape} B={B} {config}: warm-up {first_s:.2f} s, then {call_s:.3f} s per call", flush=True)
    # as many rounds as the budget allows (at least one), dropping the costliest configurations if one won't fit
    while calls:
        per_round = sum(state[c]["call_s"] for c in calls)
        fit = int(budget.left() // per_round) if per_round > 0 else args.repeats
        if fit >= 1:
            break
        config = max(calls, key=lambda c: state[c]["call_s"])
        calls.pop(config)
        samplers.pop(config)
        state[config]["skip"] = (f"skipped: over the time budget (a round predicted at {per_round:.1f} s, "
                                 f"{budget.left():.0f} s left)")
    timings = {}
    watchdog.activity = dict(base, config=" ".join(calls), stage="timed rounds")
    while calls:
        try:
            timings = bench_interleaved(calls, device=device, warmup=0, repeats=min(args.repeats, fit),
                                        memory=False)
            break
        except torch.cuda.OutOfMemoryError as err:
            # the graphs' resident caches left too little for another configuration's peak: free the largest
            config = max(calls, key=lambda c: state[c]["resident"] or 0)
            calls.pop(config)
            samplers.pop(config)
            state[config]["skip"] = f"skipped: out of GPU memory in the timed rounds ({_first_line(err)[:120]})"
            _release(device)
        except Exception as err:  # noqa: BLE001 - recorded, and the other groups still run
            for config in calls:
                state[config]["skip"] = f"failed: in the timed rounds: {_first_line(err)}"
            break
    drop_in, fast = timings.get("drop-in"), timings.get("fast")
    reference = state.get("fast", {}).get("tokens")
    for config in PASSES[pass_name]:
        if config in skipped:
            rows.append(dict(base, config=config, note=skipped[config]))
        if config not in state:
            continue
        s, t = state[config], timings.get(config)
        row = dict(base, config=config, warmup_first_s=s["first_s"], warmup_call_s=s["call_s"],
                   peak_MiB=None if s["peak"] is None else s["peak"] / 2**20,
                   resident_MiB=None if s["resident"] is None else s["resident"] / 2**20,
                   tokens_vs_fast=None if reference is None or config == "fast"
                   else _equal_fraction(s["tokens"], reference),
                   warnings=[n for n in s["notes"] if not n.startswith("failed")] or None,
                   note=s.get("skip") or next((n for n in s["notes"] if n.startswith("failed")), None))
        if t is not None:
            row.update(median_ms=t.median_ms, p20_p80_ms=f"{t.p20_ms:.4g}-{t.p80_ms:.4g}", repeats=t.repeats,
                       img_s=B / (t.median_ms * 1e-3),
                       vs_fast=None if fast is None else fast.median_ms / t.median_ms,
                       vs_dropin=None if drop_in is None else drop_in.median_ms / t.median_ms)
        rows.append(row)
    samplers.clear()
    calls.clear()
    return rows


def build_model(shape, device):
    """The random-weight VAR of ``shape`` in eval mode (its VQVAE inside), or the reason its build failed."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        vae, var = build_vae_var(device, **SHAPES[shape])
    except Exception as err:  # noqa: BLE001 - e.g. out of memory for the larger shape: the rest still runs
        _release(device)
        return f"failed: building the model: {_first_line(err)}"
    vae.eval()
    print(f"# {shape}: built in {time.perf_counter() - t0:.1f} s", flush=True)
    return var.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (the default where there is a GPU) or cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: d16 d30 (quick: tiny)")
    parser.add_argument("--batches", type=int, nargs="+", help="default: 8 64 (quick: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per shape and batch (default 3)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip what would overrun this (default 300)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile configurations")
    parser.add_argument("--json", help="output file (default: bench_results/bench_gpu_sampler-<date>.json)")
    parser.add_argument("--quick", action="store_true", help="the tiny shape at batch 2: a functional check")
    args = parser.parse_args()
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.repeats < 1 or any(b < 1 for b in args.batches or ()):
        parser.error("--repeats and --batches must be >= 1")
    shapes = args.shapes or (["tiny"] if args.quick else ["d16", "d30"])
    batches = args.batches or ([2] if args.quick else [8, 64])
    header = machine_header()
    header.update(device=str(device), shapes={s: {k: v for k, v in SHAPES[s].items()} for s in shapes},
                  batches=batches, sampling=SAMPLING, repeats=args.repeats, budget_s=args.budget_s,
                  tf32_matmul=torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None)
    # FLOPs per image of every shape, from the configuration on the meta device (nothing allocated)
    header["flops_per_image"] = {s: flops_per_image(build_vae_var("meta", **SHAPES[s])[1]) for s in shapes}
    rows, models = [], {}
    watchdog = Watchdog(budget, lambda last: write_json("bench_gpu_sampler", header, rows + [last], args.json))
    for pass_name in PASSES:
        for si, shape in enumerate(shapes):
            if shape not in models:
                watchdog.activity = dict(shape=shape, stage="building the model")
                models[shape] = build_model(shape, device)
            var = models[shape]
            if isinstance(var, str):  # the build failed: said once, in the first pass
                if pass_name == "eager":
                    rows.append(dict(shape=shape, note=var))
                continue
            with torch.inference_mode():
                if si == 0 and pass_name == "eager":
                    watchdog.activity = dict(shape=shape, stage="float32 check")
                    rows += float32_check(shape, var, batches[0] if args.quick else CHECK_BATCH, device)
                for B in batches:
                    rows += run_group(shape, B, var, device, args, budget, pass_name, watchdog)
                    write_json("bench_gpu_sampler", header, rows, args.json)
                    _release(device)
                    torch._dynamo.reset()  # compiled steps are specialised per sampler: dropped with the samplers
    watchdog.timer.cancel()
    models.clear()
    _release(device)
    header["seconds"] = time.perf_counter() - budget.start
    print_header(f"VAR sampler on {device}: drop-in vs VARSampler bfloat16, CUDA graphs and compile on/off", header)
    print_table(rows, ["pass", "shape", "B", "config", "check", "img_s", "median_ms", "vs_dropin", "vs_fast",
                       "warmup_first_s", "tokens_vs_fast", "equal_to_dropin", "peak_MiB", "note"])
    print(f"\nwrote {write_json('bench_gpu_sampler', header, rows, args.json)}")


if __name__ == "__main__":
    main()
