"""The package around the kernels: info(), the command line, and the pure-Python fallback."""
import json
import os
import subprocess
import sys
import textwrap

import torch

import varcore
from backends import require_compiled


def test_info_reports_build():
    r = varcore.info(print_report=False)
    assert r["torch"] == torch.__version__
    assert set(r["compiled"]) == {"cpu", "cuda", "emulation"}
    assert {"par_gather", "par_scatter", "par_group_scatter_"} <= set(r["ops"])
    for backends in r["ops"].values():
        assert set(backends) == {"cpu", "cuda"}
        assert set(backends.values()) <= {"kernel", "reference"}
    if r["compiled"]["cuda"]:
        assert r["cuda_archs"] and all(a.startswith("sm_") for a in r["cuda_archs"])


def test_info_with_extension():
    require_compiled()
    r = varcore.info(print_report=False)
    assert r["compiled"]["cpu"] and r["load_error"] is None
    assert r["ops"]["par_gather"]["cpu"] == "kernel"
    assert r["ops"]["par_gather"]["cuda"] == ("kernel" if r["compiled"]["cuda"] else "reference")


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "varcore", "info", "--json"], capture_output=True, text=True,
                         check=True)
    report = json.loads(out.stdout)
    assert report["torch"] == torch.__version__
    text = subprocess.run([sys.executable, "-m", "varcore", "info"], capture_output=True, text=True, check=True)
    assert "par_gather" in text.stdout and "compiled:" in text.stdout


def test_import_without_compiled_part_warns_once_and_works():
    # Block varcore._C as if it had never been built: import must work on the references and warn once.
    code = textwrap.dedent("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "varcore._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import varcore, varcore.ops
            import importlib; importlib.reload(varcore.ops)
        msgs = [str(x.message) for x in w if "compiled extension" in str(x.message)]
        assert len(msgs) == 1, msgs
        import torch
        x = torch.arange(16).reshape(1, 4, 4)
        y = varcore.ops.par_gather(x, 2)
        assert y.tolist() == [[0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]], y.tolist()
        r = varcore.info(print_report=False)
        assert not r["compiled"]["cpu"] and r["ops"]["par_gather"]["cpu"] == "reference"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
