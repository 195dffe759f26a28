"""``dtype="auto"`` for the samplers: bfloat16 where it is measurably faster than float32 on the device, else float32.

The samplers' time goes into the linear layers (GEMMs), so the choice is made by timing one GEMM of a sampler's
size (:data:`GEMM_SHAPE`, a batch of tokens through a 1024-wide layer) in both dtypes, once per device and process.
bfloat16 is chosen only when it is at least :data:`SPEEDUP_NEEDED` times faster, so that timing noise and the
casts bfloat16 adds around the GEMMs cannot make ``auto`` slower than float32. Where the device has no bfloat16
GEMM worth measuring (a CUDA device without bfloat16 support, other device types), float32 is used.
"""
import time
from typing import Callable, Dict, Optional, Tuple, Union

import torch

__all__ = ["resolve_dtype", "bf16_speedup", "GEMM_SHAPE", "SPEEDUP_NEEDED"]

GEMM_SHAPE = (256, 1024, 1024)  # (M, K, N): 256 tokens through a 1024 -> 1024 linear layer
SPEEDUP_NEEDED = 1.2
_REPEATS = 5
_CHOICE: Dict[Tuple[str, Optional[int]], torch.dtype] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gemm_seconds(dtype: torch.dtype, device: torch.device) -> float:
    """The best of :data:`_REPEATS` timings of one ``GEMM_SHAPE`` product in ``dtype`` after a warm-up."""
    M, K, N = GEMM_SHAPE
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(M, K, generator=gen, device=device).to(dtype)
    b = torch.randn(K, N, generator=gen, device=device).to(dtype)
    best = float("inf")
    for i in range(_REPEATS + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:  # the first run is the warm-up (allocation, kernel selection)
            best = min(best, time.perf_counter() - t0)
    return best


def bf16_speedup(device: Union[str, torch.device]) -> float:
    """float32 time over bfloat16 time of one ``GEMM_SHAPE`` product on ``device`` (> 1: bfloat16 is faster)."""
    device = torch.device(device)
    with torch.no_grad():
        return _gemm_seconds(torch.float32, device) / _gemm_seconds(torch.bfloat16, device)


def _bf16_measurable(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def resolve_dtype(dtype: Union[str, torch.dtype], device: Union[str, torch.device],
                  measure: Callable[[torch.device], float] = bf16_speedup) -> Union[str, torch.dtype]:
    """``dtype`` itself unless it is ``"auto"``; for ``"auto"`` bfloat16 when ``measure(device)`` (the bfloat16
    GEMM speed-up) reaches :data:`SPEEDUP_NEEDED`, else float32. The choice is cached per device for the process."""
    if not (isinstance(dtype, str) and dtype == "auto"):
        return dtype
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _CHOICE:
        faster = _bf16_measurable(device) and measure(device) >= SPEEDUP_NEEDED
        _CHOICE[key] = torch.bfloat16 if faster else torch.float32
    return _CHOICE[key]
