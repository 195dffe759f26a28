"""Optional extras: scikit-learn (``varcore[digits]``) and matplotlib (``varcore[plots]``).

Each check runs in a fresh interpreter in which importing either package fails, whether it is installed or not: ``import varcore`` and sampling the bundled models must work,
and what does need an extra must say which one, in one line on the command line.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# None in sys.modules: "import sklearn" (and of any submodule) raises ImportError, importlib.util.find_spec gives
# None, as when the package is not installed.
BLOCK_EXTRAS = textwrap.dedent("""
    import sys

    sys.modules.update(sklearn=None, matplotlib=None)
    """)


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BLOCK_EXTRAS + textwrap.dedent(code), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_the_blocker_blocks():
    out = run_blocked("""
        for name in ("sklearn", "sklearn.datasets", "matplotlib", "matplotlib.pyplot"):
            try:
                __import__(name)
            except ImportError:
                continue
            raise SystemExit(f"{name} imported")
        """)
    assert out.returncode == 0, out.stderr


def test_import_and_bundled_sampling_need_no_extras():
    out = run_blocked("""
        import varcore
        from varcore.digits import DigitsSampler

        images = DigitsSampler("digits-var").sample([0, 1], seed=0)
        assert tuple(images.shape) == (2, 3, 16, 16), images.shape
        assert 0 <= float(images.min()) and float(images.max()) <= 1
        assert not [m for m in sys.modules if m.startswith(("sklearn.", "matplotlib."))]
        print("ok")
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_varcore_sample_needs_no_extras(tmp_path):
    png = tmp_path / "grid.png"
    out = run_blocked("""
        from varcore.__main__ import main

        raise SystemExit(main(["sample", "--model", "digits-code", "--classes", "0", "1", "--seeds", "0",
                               "--out", sys.argv[1], "--no-progress"]))
        """, str(png))
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 0


@pytest.mark.parametrize("argv", [
    ["eval", "--models", "digits-var", "--per-class", "1", "--batch-size", "10", "--no-progress"],
    ["probe", "--gpt-sequences", "2", "--gpt-sources", "1", "--resamples", "1"],
    ["train-digits", "--tiny", "--no-progress", "--out", "{tmp}"],
], ids=lambda a: a[0])
def test_commands_reading_the_digits_name_the_extra(argv, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path / "weights")) for a in argv]
    out = run_blocked("""
        import json
        from varcore.__main__ import main

        raise SystemExit(main(json.loads(sys.argv[1])))
        """, json.dumps(argv))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    assert lines[-1].startswith(f"varcore {argv[0]}: error:")
    assert "pip install 'varcore[digits]'" in lines[-1]


def test_load_digits_without_sklearn_names_the_extra():
    out = run_blocked("""
        from varcore.digits import load_digits

        try:
            load_digits("test")
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("load_digits worked without scikit-learn")
        """)
    assert out.returncode == 0, out.stderr
    assert "pip install 'varcore[digits]'" in out.stdout


def test_plots_without_matplotlib_name_the_extra(tmp_path):
    report = tmp_path / "run_all.json"
    report.write_text(json.dumps({"header": {}, "results": {}}))
    out = run_blocked("""
        sys.path.insert(0, sys.argv[1])
        import plots

        sys.argv = ["plots.py", sys.argv[2], "--out", sys.argv[3]]
        raise SystemExit(plots.main())
        """, str(REPO_ROOT / "benchmarks"), str(report), str(tmp_path / "png"))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "pip install 'varcore[plots]'" in out.stderr
