"""varcore bench: run the benchmark scripts of a source checkout (benchmarks/bench_*.py).

The scripts are not part of the installed package: run this from a clone of the repository (an editable
install), where benchmarks/ sits next to the varcore package.
"""
import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

__all__ = ["add_parser", "run", "benchmarks_dir", "available"]


def benchmarks_dir() -> Optional[Path]:
    """The ``benchmarks`` folder beside the imported ``varcore`` package, or None (installed from a wheel)."""
    root = Path(__file__).resolve().parents[2] / "benchmarks"  # varcore/cli/bench.py -> the checkout
    return root if (root / "common.py").is_file() else None


def available() -> Dict[str, Path]:
    """Benchmark names (``bench_<name>.py``) -> script paths; empty without a source checkout."""
    root = benchmarks_dir()
    if root is None:
        return {}
    scripts = {p.stem[len("bench_"):]: p for p in sorted(root.glob("bench_*.py"))}
    if (root / "run_all.py").is_file():  # every benchmark + ceilings in one JSON, and the plots
        scripts["all"] = root / "run_all.py"
    return scripts


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="run benchmark scripts (from a source checkout)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="benchmarks to run (bench_NAME.py; default: every script); 'all' runs run_all.py "
                   "(every benchmark, the machine's ceilings, one JSON and the plots); see --list")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--args", default="", metavar="'ARGS'",
                   help="arguments passed to every script, as one quoted string (e.g. --args '--quick')")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    scripts = available()
    if not scripts:
        print("varcore bench: no benchmarks/ directory beside this varcore package. The benchmark scripts ship "
              "with the source repository, not with the installed package: clone the repository and install it "
              "with `pip install -e .`, then run `varcore bench` again.", file=sys.stderr)
        return 2
    if args.list:
        for name, path in scripts.items():
            print(f"{name:16s} {path}")
        return 0
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        print(f"varcore bench: unknown benchmark(s) {unknown}; available: {sorted(scripts)}", file=sys.stderr)
        return 2
    extra = shlex.split(args.args)
    failed = []
    for name in args.names or [n for n in scripts if n != "all"]:
        cmd = [sys.executable, str(scripts[name]), *extra]
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=scripts[name].parent.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"varcore bench: failed: {failed}", file=sys.stderr)
        return 1
    return 0
