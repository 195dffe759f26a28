"""scripts/gpu_check.sh --dry-run: the GPU check's JSON, produced on the CPU (no build, no CUDA tests, the benchmarks
at their quick sizes), and the pieces of the GPU-only steps that can be checked without a GPU."""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["build", "info", "tests", "bench_attention", "bench_sampler"]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), out


def test_dry_run_passes_and_prints_a_summary(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "GPU check (dry run)" in proc.stdout and f"wrote {out}" in proc.stdout
    for name in STEPS:
        assert any(line.split()[:1] == [name] for line in proc.stdout.splitlines()), name
    assert (out.parent / "check.logs" / "info.log").exists()


def test_card_section(dry_run):
    card = dry_run[1]["card"]
    for key in ("name", "torch", "torch_cuda", "triton", "flash_attn_imports", "driver_version", "nvcc", "cpus"):
        assert key in card, key
    assert card["torch"]
    if card["name"] is None:  # no GPU here: the reason is recorded
        assert card["reason"]
    if card["driver_version"] is None:
        assert card["driver_reason"]


def test_every_step_recorded_with_a_status_and_reason(dry_run):
    report = dry_run[1]
    steps = report["steps"]
    assert [s["name"] for s in steps] == STEPS
    for step in steps:
        assert step["status"] in ("ok", "failed", "skipped"), step
        assert isinstance(step["seconds"], (int, float)) and step["seconds"] >= 0
        if step["status"] != "ok":
            assert step["reason"], step
    by_name = {s["name"]: s for s in steps}
    assert by_name["build"]["status"] == by_name["tests"]["status"] == "skipped"
    assert by_name["build"]["reason"] == by_name["tests"]["reason"] == "dry run"
    assert by_name["info"]["status"] == "ok" and by_name["info"]["report"]["compiled"]["cpu"]
    assert "block_causal_attention" in by_name["info"]["text"]


def test_attention_rows(dry_run):
    step = {s["name"]: s for s in dry_run[1]["steps"]}["bench_attention"]
    assert step["status"] == "ok", step["reason"]
    timed = [r for r in step["rows"] if "median_ms" in r]
    assert {r["impl"] for r in timed} == {"kernel", "sdpa"}
    assert {r["mode"] for r in timed} == {"forward", "forward+backward"}
    assert all(r["median_ms"] > 0 and r["repeats"] >= 1 for r in timed)
    notes = {r["impl"]: r["note"] for r in step["rows"] if "median_ms" not in r}
    assert notes == {"flex": "skipped: --skip-flex", "flash-attn unmasked": "skipped: flash-attn runs on CUDA only"}
    assert step["header"]["device"] == "cpu"


def test_sampler_rows(dry_run):
    step = {s["name"]: s for s in dry_run[1]["steps"]}["bench_sampler"]
    assert step["status"] == "ok", step["reason"]
    checks = [r for r in step["rows"] if r.get("check")]
    assert [r["config"] for r in checks] == ["drop-in", "fast"]
    assert checks[1]["equal_to_dropin"] == 1.0  # float32: the same tokens
    rows = {r["config"]: r for r in step["rows"] if not r.get("check")}
    assert set(rows) == {"drop-in", "fast", "fast+graphs", "fast+compile", "fast+graphs+compile"}
    for config in ("drop-in", "fast"):
        assert rows[config]["img_s"] > 0 and rows[config]["median_ms"] > 0 and rows[config]["note"] is None
    assert rows["fast"]["vs_dropin"] > 0 and 0 <= rows["drop-in"]["tokens_vs_fast"] <= 1
    no_gpu = "skipped: cuda_graphs needs a CUDA device"
    assert rows["fast+graphs"]["note"] == rows["fast+graphs+compile"]["note"] == no_gpu
    assert rows["fast+compile"]["note"] == "skipped: --no-compile"
    assert [rows[c]["pass"] for c in rows] == ["eager"] * 3 + ["compile"] * 2


def test_build_environment_targets_the_card_only():
    gpu_check = _load_script()
    env, note = gpu_check.build_env({"capability": [9, 0]}, {"PATH": "/bin", "TORCH_CUDA_ARCH_LIST": "8.0"}, cpus=16)
    assert (env["TORCH_CUDA_ARCH_LIST"], env["VARCORE_CUDA"], env["MAX_JOBS"], note) == ("9.0", "1", "16", None)
    env, note = gpu_check.build_env({}, {"TORCH_CUDA_ARCH_LIST": "8.0"}, cpus=2)
    assert "TORCH_CUDA_ARCH_LIST" not in env and "default" in note


def test_build_falls_back_to_an_in_place_build_where_pip_refuses(tmp_path, monkeypatch):
    """pip refusing the environment leads to ``setup.py build_ext --inplace``; a build that leaves no fresh
    extension for this interpreter fails, saying so (the commands are recorded, not run)."""
    gpu_check = _load_script()
    args = argparse.Namespace(out=str(tmp_path / "r.json"), budget_s=480.0, dry_run=False, skip_build=False)
    run = gpu_check.Run(args)
    calls = []

    def fake_call(step, cmd, timeout, env=None):
        calls.append((step, [str(c) for c in cmd], env["TORCH_CUDA_ARCH_LIST"]))
        return (1, "error: externally-managed-environment") if len(calls) == 1 else (0, "built")

    monkeypatch.setattr(run, "call", fake_call)
    monkeypatch.setattr(gpu_check, "_fresh_extension", lambda since: None)
    step = gpu_check.build(run, {"capability": [9, 0]})
    assert [c[1][1:4] for c in calls] == [["-m", "pip", "install"], ["setup.py", "build_ext", "--inplace"]]
    assert "--no-deps" in calls[0][1] and "--no-build-isolation" in calls[0][1] and calls[0][2] == "9.0"
    assert step["status"] == "failed" and "no fresh varcore/_C" in step["reason"]
    assert step["command"] == "setup.py build_ext --inplace" and step["pip_refused"]
    shutil.rmtree(run.tmp)


def test_commands_are_timed_out_and_leave_nothing_running(tmp_path):
    """A command that outlives its timeout is killed (None), one that exits is not waited on for what it left
    running, and what it started is ended with it; the output is read back from the step's log."""
    gpu_check = _load_script()
    run = gpu_check.Run(argparse.Namespace(out=str(tmp_path / "r.json"), budget_s=60.0, dry_run=True,
                                           skip_build=False))
    child = "import subprocess, sys, time; p = subprocess.Popen(['sleep', '30']); print(p.pid, flush=True); "
    t0 = time.monotonic()
    rc, out = run.call("x", [sys.executable, "-c", child + "time.sleep(30)"], timeout=2)
    assert rc is None and time.monotonic() - t0 < 15
    rc, out = run.call("x", [sys.executable, "-c", child + "print('done')"], timeout=20)
    assert rc == 0 and out.split()[1] == "done" and time.monotonic() - t0 < 25
    time.sleep(0.5)
    assert not Path(f"/proc/{out.split()[0]}").exists() or "Z" in Path(f"/proc/{out.split()[0]}/stat").read_text()
    log = (tmp_path / "r.logs" / "x.log").read_text()
    assert log.count("$ ") == 2 and "killed after 2 s" in log and "[exit status 0]" in log
    shutil.rmtree(run.tmp)


def test_info_expects_the_kernels_the_cuda_sources_bind():
    ops = _load_script().cuda_ops_in_source()
    assert {"block_causal_attention", "block_causal_attention_backward", "nearest_code", "par_gather"} <= set(ops)
    assert "decode_linear" not in ops  # a CPU-only family (no *_cuda.cu)


def test_junit_counts_and_verdict(tmp_path):
    gpu_check = _load_script()
    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">
        <testcase classname="tests.ops.test_a" name="test_ok[cuda]"/>
        <testcase classname="tests.ops.test_a" name="test_bad[cuda]"><failure message="assert 1 == 2"/></testcase>
        <testcase classname="tests.ops.test_b" name="test_boom[cuda]"><error message="fixture"/></testcase>
        <testcase classname="tests.ops.test_b" name="test_skip[cuda]"><skipped message="no CUDA device"/></testcase>
        <testcase classname="" name="tests.apps.test_digits"><error message="collection failure">ImportError while
    importing test module
E   ModuleNotFoundError: No module named 'sklearn'</error></testcase>
        </testsuite></testsuites>""")
    figures = gpu_check.parse_junit(xml)
    assert {k: figures[k] for k in ("passed", "failed", "errors", "skipped")} == dict(passed=1, failed=1, errors=1,
                                                                                       skipped=1)
    assert figures["failures"] == ["tests.ops.test_a::test_bad[cuda]", "tests.ops.test_b::test_boom[cuda] (error)"]
    assert figures["skip_reasons"] == {"no CUDA device": 1}
    assert figures["not_imported"] == ["tests.apps.test_digits: ModuleNotFoundError: No module named 'sklearn'"]
    status, reason = gpu_check.tests_verdict(1, figures)
    assert status == "failed" and "2 failed" in reason and "test_bad[cuda]" in reason and "sklearn" in reason
    passing = dict(figures, failed=0, errors=0, failures=[], not_imported=[])
    assert gpu_check.tests_verdict(0, passing) == ("ok", None)
    unimported = gpu_check.tests_verdict(1, dict(passing, not_imported=["m: E"]))
    assert unimported == ("failed", "1 test modules not imported: m: E")
    assert gpu_check.tests_verdict(0, dict(passing, passed=0))[0] == "failed"
    assert gpu_check.overall_status([{"status": "ok"}, {"status": "skipped"}]) == 0
    assert gpu_check.overall_status([{"status": "ok"}, {"status": "failed"}]) == 1
