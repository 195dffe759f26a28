"""Range checks of tensor values that never stall an accelerator.

Reading a value of a GPU tensor on the host (``int(t.max())``, ``.item()``, ``.tolist()``) waits for every queued
kernel, breaks a ``torch.compile(fullgraph=True)`` graph and is illegal inside a CUDA graph capture. So the
per-call paths of varcore's ops, models, samplers and trainers check values with :func:`check_range`:

* on a host device (the CPU), where reading a value costs nothing, a ``ValueError`` naming the argument;
* elsewhere, and whenever ``torch.compile`` traces, ``torch._assert_async``: the condition is evaluated on the
  device and fails the stream asynchronously (as an out-of-range index of ``torch.nn.functional.embedding`` does).

Checks that cannot run on the device at all (a mask's bounds, a schedule's lengths) are done once where the mask or
schedule object is built, and cached with it.
"""
from typing import Optional

import torch

# The device types whose values are read on the host for free. Tests empty it to run the accelerator paths on the
# CPU (see tests/sampling/test_sync_free.py).
HOST_DEVICES = frozenset({"cpu"})


def values_on_host(x) -> bool:
    """True when the values of tensor ``x`` (or of tensors on device ``x``) may be read on the host without a device
    synchronisation, outside ``torch.compile`` tracing."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    return device.type in HOST_DEVICES and not torch.compiler.is_compiling()


def check_range(t: torch.Tensor, lo: int, hi: int, name: str, expected: Optional[str] = None) -> None:
    """Check ``lo <= t < hi`` everywhere: a ``ValueError`` naming ``name`` on a host device, a device-side assert
    (no host synchronisation) elsewhere. ``expected`` words the range in the message (default ``[lo, hi)``).
    Empty and meta tensors pass."""
    if t.numel() == 0 or t.is_meta:
        return
    expected = expected or f"[{lo}, {hi})"
    if values_on_host(t):
        t_min, t_max = int(t.min()), int(t.max())
        if t_min < lo or t_max >= hi:
            raise ValueError(f"{name} values must be in {expected}, got [{t_min}, {t_max}]")
        return
    ok = torch.logical_and(t.min() >= lo, t.max() < hi)
    torch._assert_async(ok, f"{name} values must be in {expected}")
