"""Loading of the compiled extension, backend selection per op and device, and ``varcore.info()``.

Every op has a pure-PyTorch reference; the compiled kernel is used when ``varcore._C`` was built with an
implementation for the tensor's device. ``VARCORE_BACKEND=reference`` forces the references everywhere.
"""
from __future__ import annotations

import importlib
import os
import platform
import warnings

import torch

LIBRARY = None
LOAD_ERROR: str | None = None
try:
    LIBRARY = importlib.import_module("varcore._C")
except ImportError as e:  # not built, or built against another torch
    LOAD_ERROR = str(e)
    warnings.warn(
        f"varcore: the compiled extension is not available ({LOAD_ERROR}); every op runs on its pure-PyTorch "
        "reference. Build it with `pip install --no-build-isolation .` (see varcore.info()).",
        RuntimeWarning,
        stacklevel=2,
    )

# Ops in torch.ops.varcore, filled in by the op modules as they are imported: name -> device types that have
# a compiled kernel. Computed once, since the registrations are fixed when varcore._C loads (and a plain dict
# lookup is something torch.compile can trace).
OPS: dict[str, frozenset] = {}


def register_op(name: str) -> str:
    """Record an op for ``info()`` and dispatch, and return its qualified name ``varcore::name``."""
    OPS[name] = frozenset(dev for dev in ("cpu", "cuda") if _has_kernel(name, dev))
    return f"varcore::{name}"


def force_reference() -> bool:
    return os.environ.get("VARCORE_BACKEND", "").lower() == "reference"


def has_schema(op: str) -> bool:
    """Whether ``varcore._C`` defines ``torch.ops.varcore.<op>`` (False for a stale build that predates it)."""
    if LIBRARY is None:
        return False
    try:
        getattr(torch.ops.varcore, op)
    except (AttributeError, RuntimeError):
        return False
    return True


def _has_kernel(op: str, device_type: str) -> bool:
    if not has_schema(op):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"varcore::{op}", key)


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.varcore.<op>`` runs a compiled kernel on ``device`` (else the reference is used): the
    op has a kernel for the device type and, on a GPU, the build holds an image the GPU can run."""
    if device.type not in OPS[op] or force_reference():
        return False
    return device.type != "cuda" or cuda_image_fits(device)


def compiled_cuda_archs() -> list[tuple[int, int, bool]]:
    """The CUDA architectures of the build as (major, minor, with PTX), e.g. [(8, 0, False), (9, 0, True)]."""
    archs = getattr(LIBRARY, "CUDA_ARCHS", "") if LIBRARY is not None else ""
    out = []
    for token in filter(None, archs.split("_")):  # "sm80", "sm90ptx"
        digits = token[2:].removesuffix("ptx")
        out.append((int(digits[:-1]), int(digits[-1]), token.endswith("ptx")))
    return out


def image_runs_on(archs: list[tuple[int, int, bool]], capability: tuple[int, int]) -> bool:
    """Whether a build for ``archs`` has code for a GPU of compute ``capability``: machine code for sm_XY runs on
    X.y with y >= Y (same major), PTX for compute_XY is compiled by the driver for any capability >= X.Y."""
    return any((capability[0] == major and capability[1] >= minor) or (ptx and capability >= (major, minor))
               for major, minor, ptx in archs)


_CUDA_IMAGE_FITS: dict[int, bool] = {}


def cuda_image_fits(device: torch.device) -> bool:
    """Whether the build can run on CUDA ``device`` (decided once per GPU; a GPU it cannot run on gets one
    warning and the standard PyTorch path for every op, instead of a "no kernel image" error)."""
    if not torch.cuda.is_available():  # no GPU to ask (info() on a machine without one): the build decides
        return True
    index = torch.cuda.current_device() if device.index is None else device.index
    fits = _CUDA_IMAGE_FITS.get(index)
    if fits is None:
        archs, capability = compiled_cuda_archs(), torch.cuda.get_device_capability(index)
        fits = _CUDA_IMAGE_FITS[index] = not archs or image_runs_on(archs, capability)
        if not fits:
            built = ", ".join(f"sm_{a}{b}" + (" (+PTX)" if ptx else "") for a, b, ptx in archs)
            warnings.warn(f"varcore: the CUDA kernels were built for {built}, which cannot run on this "
                          f"sm_{capability[0]}{capability[1]} GPU ({torch.cuda.get_device_name(index)}): its ops "
                          f"run on the standard PyTorch path. Rebuild for it with TORCH_CUDA_ARCH_LIST="
                          f"{capability[0]}.{capability[1]} pip install --no-build-isolation .",
                          RuntimeWarning, stacklevel=3)
    return fits


def _simt_status() -> str:
    try:
        importlib.import_module("varcore._simt")
        return "built"
    except ImportError:
        return "not built (VARCORE_SIMT=1 at install)"


def info(print_report: bool = True) -> dict:
    """Describe the installation: torch, compiled parts, CUDA architectures, and each op's backend per device."""
    import varcore.ops  # registers the op names
    import varcore.ops.attention

    cuda_built = bool(LIBRARY is not None and getattr(LIBRARY, "WITH_CUDA", 0))
    archs = getattr(LIBRARY, "CUDA_ARCHS", "") if cuda_built else ""
    report = {
        "varcore": importlib.import_module("varcore").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "cpu-only build",
        "cuda_available": torch.cuda.is_available(),
        "compiled": {
            "cpu": LIBRARY is not None,
            "cuda": cuda_built,
            "emulation": _simt_status(),
        },
        "load_error": LOAD_ERROR,
        "cuda_archs": [a.replace("sm", "sm_") for a in archs.split("_") if a],
        "compiler": getattr(LIBRARY, "CXX_COMPILER", None),
        "backend_forced_to_reference": force_reference(),
        "ops": {op: {dev: ("kernel" if use_kernel(op, torch.device(dev)) else "reference") for dev in ("cpu", "cuda")}
                for op in OPS},
        "attention": varcore.ops.attention.attention_backends(),
    }
    if print_report:
        print(_format(report))
    return report


def _format(r: dict) -> str:
    c = r["compiled"]
    lines = [
        f"varcore {r['varcore']}  python {r['python']}  torch {r['torch']} (CUDA: {r['torch_cuda']}, "
        f"device available: {r['cuda_available']})",
        f"compiled: cpu={'yes' if c['cpu'] else 'no'}  cuda={'yes' if c['cuda'] else 'no'}  "
        f"emulation={c['emulation']}",
    ]
    if r["cuda_archs"]:
        lines.append(f"cuda archs: {' '.join(r['cuda_archs'])}")
    if r["load_error"]:
        lines.append(f"extension load error: {r['load_error']}")
    if r["backend_forced_to_reference"]:
        lines.append("VARCORE_BACKEND=reference: every op uses its reference")
    width = max([len("op"), *map(len, r["ops"])]) + 2
    lines.append(f"{'op':<{width}}{'cpu':<11}{'cuda'}")
    for op, backends in r["ops"].items():
        lines.append(f"{op:<{width}}{backends['cpu']:<11}{backends['cuda']}")
    for dev, choice in r["attention"].items():
        lines.append(f"model attention on {dev}: masked (training, prefill) -> {choice['masked']}, "
                     f"KV-cache steps -> {choice['unmasked']}")
    return "\n".join(lines)
