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


# ---------------------------------------------------------------------------------------------- CUDA images
AMPERE_HOPPER_PTX = [(8, 0, False), (9, 0, True)]


def test_image_runs_on_follows_cuda_compatibility():
    """Machine code runs within its major version at equal or higher minor; PTX on any newer GPU."""
    from varcore.ops.extension import image_runs_on

    cases = {(7, 5): False, (8, 0): True, (8, 6): True, (8, 9): True, (9, 0): True, (10, 0): True, (12, 0): True}
    for capability, fits in cases.items():
        assert image_runs_on(AMPERE_HOPPER_PTX, capability) is fits, capability
    no_ptx = [(8, 0, False), (9, 0, False)]
    assert not image_runs_on(no_ptx, (10, 0)) and not image_runs_on(no_ptx, (12, 0))
    assert not image_runs_on([(8, 6, False)], (8, 0))  # sm_86 code does not run on an sm_80 GPU
    assert image_runs_on([(12, 0, False)], (12, 1)) and not image_runs_on([(10, 0, False)], (12, 0))


def test_compiled_cuda_archs_parse_the_build_record(monkeypatch):
    from varcore.ops import extension

    monkeypatch.setattr(extension, "LIBRARY", type("Lib", (), {"CUDA_ARCHS": "sm80_sm90ptx_sm100_sm120"}))
    assert extension.compiled_cuda_archs() == [(8, 0, False), (9, 0, True), (10, 0, False), (12, 0, False)]


def test_gpu_without_an_image_falls_back_with_one_warning(monkeypatch):
    """A GPU the build has no code for gets the reference path and one warning, not a "no kernel image" error."""
    import warnings

    from varcore.ops import extension

    require_compiled()
    monkeypatch.setattr(extension, "OPS", {"par_gather": frozenset({"cpu", "cuda"})})
    monkeypatch.setattr(extension, "compiled_cuda_archs", lambda: [(8, 0, False), (9, 0, False)])
    monkeypatch.setattr(extension, "_CUDA_IMAGE_FITS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a Blackwell GPU")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert not extension.use_kernel("par_gather", torch.device("cuda", 0))
    assert len(caught) == 1 and "sm_120" in str(caught[0].message) and "TORCH_CUDA_ARCH_LIST=12.0" in str(
        caught[0].message)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert extension.use_kernel("par_gather", torch.device("cuda", 1))
    assert extension.use_kernel("par_gather", torch.device("cpu"))
