"""Backends under test for an op family: the reference, the compiled CPU kernel, the CUDA kernel run through
the host emulation (varcore._simt) and, with a GPU, the real CUDA kernel."""
import importlib
import os
import types

import pytest
import torch

BACKENDS = ["reference", "cpu", "simt", "cuda"]


def require_compiled():
    """The compiled extension, or a skip (a failure under CI, where it must have been built)."""
    from varcore.ops import extension

    if extension.LIBRARY is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"varcore._C must be built under CI: {extension.LOAD_ERROR}")
        pytest.skip(f"varcore._C not built: {extension.LOAD_ERROR}")
    return extension.LIBRARY


def require_simt():
    """Import varcore._simt, or skip (fail when VARCORE_REQUIRE_SIMT=1, as in CI)."""
    try:
        return importlib.import_module("varcore._simt")
    except ImportError as e:
        if os.environ.get("VARCORE_REQUIRE_SIMT") == "1":
            pytest.fail(f"varcore._simt must be built (VARCORE_REQUIRE_SIMT=1): {e}")
        pytest.skip(f"emulation extension not built (install with VARCORE_SIMT=1): {e}")


def resolve(backend: str, names: dict) -> types.SimpleNamespace:
    """names maps a short name to (reference callable, op name). Returns callables plus the device to use."""
    if backend == "reference":
        return types.SimpleNamespace(device="cpu", **{k: ref for k, (ref, _) in names.items()})
    if backend == "cpu":
        require_compiled()
        return types.SimpleNamespace(device="cpu", **{k: getattr(torch.ops.varcore, op) for k, (_, op) in names.items()})
    if backend == "simt":
        require_compiled()
        require_simt()
        return types.SimpleNamespace(
            device="cpu", **{k: getattr(torch.ops.varcore_simt, op) for k, (_, op) in names.items()})
    if backend == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        return types.SimpleNamespace(device="cuda", **{k: getattr(torch.ops.varcore, op) for k, (_, op) in names.items()})
    raise ValueError(backend)


def backend_params():
    return [pytest.param(b, marks=[pytest.mark.cuda] if b == "cuda" else
                         [pytest.mark.simt] if b == "simt" else []) for b in BACKENDS]
