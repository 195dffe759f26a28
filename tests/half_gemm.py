"""Half-precision facts hold only where half-precision GEMMs round as on the machine that recorded them.

A bfloat16 / float16 GEMM on the CPU rounds differently by instruction set (native bf16 dot products with
AVX512-BF16 or AMX, or conversion to float32 on AVX2 only) and by library kernel, so tokens drawn from half-precision
logits recorded on one machine can differ on another at a near-tie, with the official code as with varcore. The
fingerprint is a hash of a few GEMMs of the shapes the models use; a test of recorded half-precision facts skips,
saying so, on a machine whose fingerprint differs from the recording machine's.
"""
import hashlib

import pytest
import torch
import torch.nn.functional as F


def gemm_fingerprint(dtype: torch.dtype) -> str:
    g = torch.Generator().manual_seed(0)
    outs = []
    for m, k, n in ((7, 64, 48), (130, 256, 768), (2, 1024, 4096)):
        a, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
        outs.append(F.linear(a, w))
    return hashlib.sha256(b"".join(o.float().numpy().tobytes() for o in outs)).hexdigest()[:16]


def require_recorded_rounding(dtype: torch.dtype, recorded: dict, what: str) -> None:
    """Skip unless this CPU's ``dtype`` GEMMs round as on the machine where ``what`` was recorded (``recorded``:
    dtype name -> fingerprint there)."""
    name = str(dtype).removeprefix("torch.")
    here = gemm_fingerprint(dtype)
    if here != recorded[name]:
        pytest.skip(f"{what}: this CPU rounds {name} GEMMs differently from the machine that recorded the facts "
                    f"(GEMM fingerprint {here}, recorded {recorded[name]}); exact equality needs the same rounding")
