"""varcore.memory.keep_freed_memory: glibc keeps freed memory, so a large tensor allocated again is not mapped (and
page-faulted) afresh. Process-wide, so each case runs in its own interpreter."""
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from varcore.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(64 << 18)  # 64 MiB, touched
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[-8:]))  # steady state: the heap settles after a varying number of rounds
"""


def _run(mode: str):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_large_tensors():
    applied, kept = _run("keep")
    _, default = _run("default")
    assert applied == "True"
    # 64 MiB are 16384 pages: glibc's default maps them afresh every round; kept memory stops faulting
    assert default > 16384 // 2, default
    assert kept < default // 10, (kept, default)


def test_keep_freed_memory_is_idempotent():
    # in its own interpreter too: the setting must not leak into the test process
    subprocess.run([sys.executable, "-c", "from varcore.memory import keep_freed_memory\n"
                    "first = keep_freed_memory()\nassert keep_freed_memory() is first"], check=True, timeout=120)
