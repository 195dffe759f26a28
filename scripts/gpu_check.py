"""One check of varcore on a GPU machine: the card, the build, the CUDA tests and the two GPU benchmarks, in one JSON.

    bash scripts/gpu_check.sh [OUT.json] [--skip-build] [--budget-s 480]      (from any folder)
    python scripts/gpu_check.py --out OUT.json [--skip-build] [--budget-s S] [--dry-run]

Steps, each timed and recorded in ``OUT.json`` as ``{"name", "status": "ok" | "failed" | "skipped", "reason",
"seconds", ...figures}``; a step that fails, or finds no time left, is recorded with its reason and the next one
still runs:

  build            ``pip install --no-deps --no-build-isolation --no-index -e .`` for the card's arch only
                   (``TORCH_CUDA_ARCH_LIST=<major>.<minor>``, ``VARCORE_CUDA=1``, ``MAX_JOBS=<cpus>``); where pip
                   is missing or refuses the environment, ``setup.py build_ext --inplace`` instead
  info             ``varcore.info()`` of that build: its report; failed unless every op whose family has CUDA
                   sources (``csrc/*/*_cuda.cu``) runs its CUDA kernel
  tests            ``pytest -m cuda``: passed / failed / skipped counts from the junit XML, the failures' names
  bench_attention  ``benchmarks/bench_attention.py --device cuda --dtype bfloat16`` (kernel, dense masked SDPA,
                   FlexAttention, flash-attn unmasked where installed), its rows copied in
  bench_sampler    ``benchmarks/bench_gpu_sampler.py`` (d16 and d30 shapes, batches 8 and 64: the drop-in against
                   ``VARSampler`` bfloat16 with CUDA graphs and compile on/off, the float32 token check)

``card`` holds the GPU (name, compute capability, memory), the driver (``nvidia-smi``), torch / CUDA / Triton
versions, nvcc, whether flash-attn imports and the build tools. Every subprocess gets a timeout from what is left
of ``--budget-s`` (default 480 s, the build included), with a little kept back for the steps after it; the full
output of each step goes to ``OUT.logs/<step>.log``. At the end a short summary is printed; the exit status is 1
if a step failed, 0 when every step passed or was skipped with a reason.

``--dry-run`` tests this script without a GPU: no build and no CUDA tests (both "skipped: dry run"), the
benchmarks at their quick sizes on the CPU with one thread (FlexAttention and torch.compile left out, as
compiling them on a CPU takes minutes); the JSON has the same structure.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL = 3000  # characters of a failed step's output kept in the JSON
# The most each step may take, and the least kept back for each step still to come.
CAPS_S = {"card": 60, "build": 300, "info": 60, "tests": 150, "bench_attention": 150, "bench_sampler": None}
KEEP_S = {"info": 15, "tests": 30, "bench_attention": 30, "bench_sampler": 60}
STEPS = ("build", "info", "tests", "bench_attention", "bench_sampler")

CARD_PROBE = r"""
import importlib, json, os, platform
out = {"python": platform.python_version(), "cpus": os.cpu_count()}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_GiB=round(props.total_memory / 2**30, 2), gpus=torch.cuda.device_count())
    else:
        out["reason"] = "torch sees no CUDA device"
except Exception as e:
    out["reason"] = f"torch failed: {type(e).__name__}: {e}"
print("CARD " + json.dumps(out), flush=True)
# one line per module, so that one whose import crashes the interpreter loses only its own line
for name in ("triton", "flash_attn", "setuptools", "ninja", "pytest"):
    try:
        found = {name: getattr(importlib.import_module(name), "__version__", "imported")}
    except Exception as e:
        found = {name: None, name + "_reason": f"{type(e).__name__}: {e}"[:300]}
    print("CARD " + json.dumps(found), flush=True)
"""

INFO_PROBE = r"""
import json, varcore
report = varcore.info()
print("INFO " + json.dumps(report, default=str))
"""


class Run:
    """The budget and the settings shared by every step."""

    def __init__(self, args):
        self.args, self.start = args, time.monotonic()
        self.python = sys.executable
        self.logs = Path(str(args.out) + ".logs") if not str(args.out).endswith(".json") \
            else Path(str(args.out)[:-5] + ".logs")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started_logs = set()  # each step's log is started afresh by its first command
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        # the checkout first on the import path; the interpreter's bin first on PATH (ninja, pip-installed tools)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join([str(ROOT)] + _split(os.environ.get("PYTHONPATH"))),
                        PATH=os.pathsep.join([str(Path(self.python).parent)] + _split(os.environ.get("PATH"))))
        if args.dry_run:  # a functional check: one thread each, which a busy CPU does not stall
            self.env.setdefault("OMP_NUM_THREADS", "1")

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def timeout(self, step: str) -> float:
        """Seconds ``step`` may take: its cap, within what is left after keeping back some for the later steps."""
        later = STEPS[STEPS.index(step) + 1:] if step in STEPS else STEPS
        if self.args.dry_run:
            later = [s for s in later if s not in ("build", "tests")]
        keep = sum(KEEP_S.get(s, 0) for s in later)
        cap = CAPS_S.get(step) or float("inf")
        return max(0.0, min(cap, self.left() - keep))

    def call(self, step: str, cmd, timeout: float, env=None):
        """Run ``cmd`` in the checkout in a process group of its own, its output going to the step's log; returns
        (exit status, or None when it was killed at ``timeout``, and its output). What the command left running
        (compile workers, ninja, nvcc) is ended with it: its process group is killed once it has exited."""
        log = self.logs / f"{step}.log"
        with open(log, "a" if step in self.started_logs else "w") as f:
            self.started_logs.add(step)
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            offset = log.stat().st_size
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # nothing of it is left
                pass
            proc.wait()
        with open(log, "rb") as f:
            f.seek(offset)
            out = f.read().decode(errors="replace")
        with open(log, "a") as f:
            f.write(f"\n[exit status {rc if rc is not None else f'none: killed after {timeout:.0f} s'}]\n")
        return rc, out


def _split(paths):
    return [p for p in (paths or "").split(os.pathsep) if p]


def step_result(name, status, reason=None, seconds=0.0, **figures):
    return dict(name=name, status=status, reason=reason, seconds=round(seconds, 2), **figures)


def _tail(text: str) -> str:
    return text[-LOG_TAIL:]


def _timeout_reason(seconds: float) -> str:
    return f"timed out after {seconds:.0f} s (budget)"


# ---------------------------------------------------------------------------------------------- card
def driver_version():
    """(driver version, None) from nvidia-smi, or (None, why not)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "nvidia-smi not found"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"nvidia-smi failed: {e}"
    if out.returncode != 0 or not out.stdout.strip():
        return None, f"nvidia-smi exit status {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}"
    return out.stdout.strip().splitlines()[0], None


def nvcc_version():
    """(release, None) of nvcc on PATH or in CUDA_HOME, or (None, why not)."""
    candidates = [shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")]
    nvcc = next((c for c in candidates if c and os.path.exists(c)), None)
    if nvcc is None:
        return None, "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"nvcc failed: {e}"
    m = re.search(r"release (\d+\.\d+)", out)
    return (m.group(1), None) if m else (None, "nvcc --version gave no release")


def card(run: Run) -> dict:
    """The GPU, the driver and the software stack, probed in a subprocess (this process stays off the GPU)."""
    t0 = time.monotonic()
    rc, out = run.call("card", [run.python, "-c", CARD_PROBE], timeout=max(5.0, run.timeout("card")))
    info = {}
    for line in out.splitlines():
        if line.startswith("CARD "):
            info.update(json.loads(line[5:]))
    if rc != 0:
        info["probe_error"] = f"exit status {rc}: {_tail(out)[-500:]}"
        info.setdefault("reason", "the probe failed")
    info.setdefault("name", None)
    info["driver_version"], reason = driver_version()
    if reason:
        info["driver_reason"] = reason
    info["nvcc"], reason = nvcc_version()
    if reason:
        info["nvcc_reason"] = reason
    info["flash_attn_imports"] = info.get("flash_attn") is not None
    info["machine"] = platform.node()
    info["seconds"] = round(time.monotonic() - t0, 2)
    return info


# ---------------------------------------------------------------------------------------------- build
def build_env(card_info: dict, base_env: dict, cpus=None) -> tuple:
    """(environment, note) of the build: the card's architecture only, the CUDA part required, one job per CPU."""
    env = dict(base_env, VARCORE_CUDA="1", MAX_JOBS=str(cpus or os.cpu_count() or 1))
    capability = card_info.get("capability")
    if capability:
        env["TORCH_CUDA_ARCH_LIST"] = f"{capability[0]}.{capability[1]}"
        return env, None
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    return env, "no card capability known: setup.py's default architectures"


def _fresh_extension(since: float):
    """The in-tree varcore._C for this interpreter when it was (re)built after ``since``, else None."""
    path = ROOT / "varcore" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    return path if path.exists() and path.stat().st_mtime >= since - 1 else None


def build(run: Run, card_info: dict) -> dict:
    t0, wall0 = time.monotonic(), time.time()
    env, note = build_env(card_info, run.env)
    # without ninja on PATH torch compiles one file at a time, which would not fit the budget
    figures = dict(arch_list=env.get("TORCH_CUDA_ARCH_LIST"), max_jobs=env["MAX_JOBS"], arch_note=note,
                   ninja=shutil.which("ninja", path=env["PATH"]))
    # nothing is fetched: no dependencies, no build environment, no index, no version check
    pip = [run.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "-e", "."]
    rc, out = run.call("build", pip, run.timeout("build"), env=env)
    figures["command"] = " ".join(pip[1:])
    if rc is not None and rc != 0 and ("No module named pip" in out or "externally-managed-environment" in out):
        figures["pip_refused"] = _tail(out)[-300:]
        inplace = [run.python, "setup.py", "build_ext", "--inplace"]
        figures["command"] = " ".join(inplace[1:])
        rc, out = run.call("build", inplace, run.timeout("build"), env=env)
    seconds = time.monotonic() - t0
    if rc is None:
        return step_result("build", "failed", _timeout_reason(seconds), seconds, log_tail=_tail(out), **figures)
    if rc != 0:
        errors = [ln for ln in out.splitlines() if "error" in ln.lower()][:5]
        return step_result("build", "failed", f"exit status {rc}: " + (" | ".join(errors) or "see log_tail")[:600],
                           seconds, log_tail=_tail(out), **figures)
    ext = _fresh_extension(wall0)
    if ext is None:
        return step_result("build", "failed", "the build finished but left no fresh varcore/_C"
                           f"{sysconfig.get_config_var('EXT_SUFFIX')} in the checkout", seconds,
                           log_tail=_tail(out), **figures)
    return step_result("build", "ok", None, seconds, extension=str(ext.relative_to(ROOT)),
                       extension_MiB=round(ext.stat().st_size / 2**20, 1), **figures)


# ---------------------------------------------------------------------------------------------- info
def cuda_ops_in_source() -> list:
    """The ops that have a CUDA kernel in this checkout: those its op families with a ``*_cuda.cu`` file bind
    (``m.impl("name", ...)`` in the family's ``*_glue.h``)."""
    ops = []
    for cu in sorted(ROOT.glob("csrc/*/*_cuda.cu")):
        glue = cu.with_name(cu.name.replace("_cuda.cu", "_glue.h"))
        if glue.exists():
            ops += re.findall(r'm\.impl\("([^"]+)"', glue.read_text())
    return ops


def info(run: Run) -> dict:
    t0 = time.monotonic()
    rc, out = run.call("info", [run.python, "-c", INFO_PROBE], run.timeout("info"))
    seconds = time.monotonic() - t0
    line = next((ln for ln in out.splitlines() if ln.startswith("INFO ")), None)
    if rc is None:
        return step_result("info", "failed", _timeout_reason(seconds), seconds, log_tail=_tail(out))
    if rc != 0 or line is None:
        return step_result("info", "failed", f"exit status {rc}", seconds, log_tail=_tail(out))
    report = json.loads(line[5:])
    text = "\n".join(ln for ln in out.splitlines() if not ln.startswith("INFO "))
    problems = []
    if report.get("load_error"):
        problems.append(f"varcore._C did not load: {report['load_error']}")
    if not run.args.dry_run:
        if not report.get("compiled", {}).get("cuda"):
            problems.append("varcore._C was built without its CUDA part")
        ops = report.get("ops", {})
        missing = [op for op in cuda_ops_in_source() if ops.get(op, {}).get("cuda") != "kernel"]
        if missing:
            problems.append(f"no CUDA kernel in use for {', '.join(missing)}")
    return step_result("info", "failed" if problems else "ok", "; ".join(problems) or None, seconds,
                       report=report, text=text)


# ---------------------------------------------------------------------------------------------- tests
def parse_junit(path) -> dict:
    """Counts (passed, failed, errors, skipped), the failures' names, the skip reasons and the test modules that
    could not be imported (with the error's last line) from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures, skips, not_imported = [], {}, []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        error = next((c for c in case if c.tag == "error"), None)
        if error is not None and error.get("message") == "collection failure":
            last = [ln.strip() for ln in (error.text or "").splitlines() if ln.startswith("E ")][-1:]
            not_imported.append(f"{case.get('name', '')}: {last[0][1:].strip() if last else 'collection failure'}")
        elif "failure" in kinds:
            counts["failed"] += 1
            failures.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failures.append(name + " (error)")
        elif "skipped" in kinds:
            counts["skipped"] += 1
            message = next(c for c in case if c.tag == "skipped").get("message", "")[:160]
            skips[message] = skips.get(message, 0) + 1
        else:
            counts["passed"] += 1
    top_skips = dict(sorted(skips.items(), key=lambda kv: -kv[1])[:8])
    return dict(counts, failures=failures, skip_reasons=top_skips, not_imported=not_imported)


def tests(run: Run) -> dict:
    t0 = time.monotonic()
    xml = run.tmp / "junit.xml"
    # a module that cannot be imported here (an optional package missing) is reported, and the others still run
    cmd = [run.python, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}"]
    rc, out = run.call("tests", cmd, run.timeout("tests"))
    seconds = time.monotonic() - t0
    if rc is None:
        return step_result("tests", "failed", _timeout_reason(seconds), seconds, log_tail=_tail(out))
    if not xml.exists():
        return step_result("tests", "failed", f"exit status {rc}, no junit XML written", seconds, log_tail=_tail(out))
    figures = parse_junit(xml)
    return step_result("tests", *tests_verdict(rc, figures), seconds, **figures,
                       log_tail=_tail(out) if rc != 0 else None)


def tests_verdict(rc, figures) -> tuple:
    """(status, reason) of the tests step from pytest's exit status and the junit counts."""
    bad = figures["failed"] + figures["errors"]
    missing = figures.get("not_imported") or []
    if bad or missing:
        shown = ", ".join(figures["failures"][:5]) + (" ..." if bad > 5 else "")
        unimported = f"{len(missing)} test modules not imported: {'; '.join(missing[:3])}" if missing else ""
        return "failed", "; ".join(x for x in (f"{bad} failed: {shown}" if bad else "", unimported) if x)
    if rc == 5 or figures["passed"] == 0:
        return "failed", "no CUDA test ran (all skipped or none collected)"
    if rc != 0:
        return "failed", f"pytest exit status {rc}"
    return "ok", None


# ---------------------------------------------------------------------------------------------- benchmarks
def _bench(run: Run, name: str, cmd, out_json: Path, timeout: float) -> dict:
    t0 = time.monotonic()
    rc, out = run.call(name, cmd, timeout)
    seconds = time.monotonic() - t0
    result = json.loads(out_json.read_text()) if out_json.exists() else None
    figures = dict(command=" ".join(map(str, cmd[1:])), header=result and result["header"],
                   rows=result["rows"] if result else [])
    if rc is None:
        return step_result(name, "failed", _timeout_reason(seconds) + (
            f"; {len(figures['rows'])} rows written before" if result else ""), seconds, log_tail=_tail(out),
            **figures)
    if rc != 0 or result is None:
        last = next((ln.strip() for ln in reversed(out.splitlines()) if ln.strip()), "")
        return step_result(name, "failed", f"exit status {rc}" + ("" if result else ", no JSON written") +
                           (f": {last[:300]}" if last else ""), seconds, log_tail=_tail(out), **figures)
    failed = [r for r in figures["rows"] if str(r.get("note") or "").startswith("failed")]
    if failed:
        reason = "; ".join(f"{_row_label(r)}: {r['note']}" for r in failed[:4])
        return step_result(name, "failed", reason[:800], seconds, **figures)
    return step_result(name, "ok", None, seconds, **figures)


def _row_label(row: dict) -> str:
    keys = ("shape", "L", "mode", "B", "config", "impl", "check")
    return " ".join(f"{row[k]}" for k in keys if row.get(k) is not None)


def bench_attention(run: Run) -> dict:
    out = run.tmp / "attention.json"
    cmd = [run.python, "benchmarks/bench_attention.py", "--out", out]
    cmd += ["--device", "cpu", "--quick", "--skip-flex"] if run.args.dry_run else \
        ["--device", "cuda", "--dtype", "bfloat16"]
    return _bench(run, "bench_attention", cmd, out, run.timeout("bench_attention"))


def bench_sampler(run: Run) -> dict:
    out = run.tmp / "sampler.json"
    timeout = run.timeout("bench_sampler")
    # the benchmark's own budget leaves time for its start-up and the JSON; the timeout is the backstop
    cmd = [run.python, "benchmarks/bench_gpu_sampler.py", "--json", out, "--budget-s", str(max(5, int(timeout - 30)))]
    cmd += ["--device", "cpu", "--quick", "--no-compile"] if run.args.dry_run else ["--device", "cuda"]
    return _bench(run, "bench_sampler", cmd, out, timeout)


# ---------------------------------------------------------------------------------------------- summary
def summary_line(step: dict) -> str:
    head = f"  {step['name']:<16} {step['status']:<8} {step['seconds']:7.1f} s"
    if step["status"] != "ok":
        return f"{head}  {step['reason']}"
    if step["name"] == "tests":
        return f"{head}  {step['passed']} passed, {step['skipped']} skipped"
    if step["name"] == "build":
        return f"{head}  {step['extension']} for {step['arch_list'] or 'setup.py default archs'}"
    if step["name"] == "info":
        return f"{head}  CUDA archs {', '.join(step['report'].get('cuda_archs') or []) or '-'}"
    timed = [r for r in step.get("rows", []) if r.get("median_ms")]
    skipped = [r for r in step.get("rows", []) if str(r.get("note") or "").startswith("skipped")]
    return f"{head}  {len(timed)} rows timed, {len(skipped)} skipped"


def highlights(steps) -> list:
    """A few headline figures: attention at L=2240 against SDPA, the sampler's best images/s per shape and batch."""
    lines = []
    by_name = {s["name"]: s for s in steps}
    attention = [r for r in by_name.get("bench_attention", {}).get("rows", []) if r.get("median_ms")]
    longest = max((r["L"] for r in attention), default=None)
    for r in attention:
        if r["impl"] != "sdpa" and r["L"] == longest:
            lines.append(f"  attention L={r['L']} {r['mode']}: {r['impl']} {r['median_ms']:.3g} ms "
                         f"({r['time_vs_sdpa']:.2f}x SDPA's time)")
    groups = {}
    for r in by_name.get("bench_sampler", {}).get("rows", []):
        if r.get("check") and r.get("equal_to_dropin") is not None:
            lines.append(f"  sampler float32 tokens, {r['config']} B={r['B']}: {100 * r['equal_to_dropin']:.4g}% "
                         f"equal to the drop-in's")
        if r.get("img_s"):
            groups.setdefault((r["shape"], r["B"]), []).append(r)
    for (shape, B), rows in groups.items():
        best = max(rows, key=lambda r: r["img_s"])
        vs = f", {best['vs_dropin']:.2f}x the drop-in" if best.get("vs_dropin") else ""
        lines.append(f"  sampler {shape} B={B}: best {best['config']} {best['img_s']:.3g} images/s{vs}")
    return lines


def preset_skip(name: str, args):
    """Why ``name`` does not run at all with these arguments, or None."""
    if args.dry_run and name in ("build", "tests"):
        return "dry run"
    if args.skip_build and name == "build":
        return "--skip-build"
    return None


def overall_status(steps) -> int:
    return 1 if any(s["status"] == "failed" for s in steps) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: no build, no CUDA tests, tiny benchmarks")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built in the checkout")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole check (default 480)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    run = Run(args)
    report = {"dry_run": args.dry_run, "budget_s": args.budget_s, "checkout": str(ROOT), "card": card(run),
              "steps": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    c = report["card"]
    print(f"[gpu_check] card: {c.get('name') or c.get('reason')}, capability {c.get('capability')}, "
          f"driver {c.get('driver_version') or c.get('driver_reason')}, torch {c.get('torch')} "
          f"(CUDA {c.get('torch_cuda')}), triton {c.get('triton')}, flash-attn {c.get('flash_attn') or 'no'}",
          flush=True)
    steps = {"build": lambda: build(run, c), "info": lambda: info(run), "tests": lambda: tests(run),
             "bench_attention": lambda: bench_attention(run), "bench_sampler": lambda: bench_sampler(run)}
    for name in STEPS:
        print(f"[gpu_check] {name} ({run.left():.0f} s of the budget left) ...", flush=True)
        not_run = preset_skip(name, args)
        if not_run is None and run.timeout(name) < 10:
            not_run = f"budget spent ({run.left():.0f} s left, {run.timeout(name):.0f} s for this step)"
        try:
            step = step_result(name, "skipped", not_run) if not_run else steps[name]()
        except Exception as e:  # noqa: BLE001 - a bug in one step must not lose the others' results
            step = step_result(name, "failed", f"gpu_check itself failed: {type(e).__name__}: {e}")
        report["steps"].append(step)
        print(summary_line(step), flush=True)
        out.write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = round(time.monotonic() - run.start, 1)
    out.write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(run.tmp, ignore_errors=True)
    print(f"\nGPU check{' (dry run)' if args.dry_run else ''}: {c.get('name') or c.get('reason')}, "
          f"{report['seconds']:.0f} s of {args.budget_s:.0f}")
    for step in report["steps"]:
        print(summary_line(step))
    for line in highlights(report["steps"]):
        print(line)
    status = overall_status(report["steps"])
    print(f"{'FAILED' if status else 'ok'}: wrote {out} (logs in {run.logs})")
    return status


if __name__ == "__main__":
    sys.exit(main())
