"""allocator.retain_freed_memory: freed tensors stay in the process (no page faults on reuse)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from torchcvt.allocator import retain_freed_memory
applied = retain_freed_memory()
faults = []
for _ in range(6):  # a 64 MiB activation made, written and freed, as every forward does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 1024 * 1024)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[2:]))  # after two warm-up rounds
"""


def _child(retain: str) -> tuple[str, int]:
    env = {**os.environ, "TORCHCVT_RETAIN_MEMORY": retain}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    """The kernel's page-fault count is the reference: 16,384 per 64 MiB mapped afresh, ~0 when reused."""
    applied, retained = _child("1")
    off, default = _child("0")
    assert (applied, off) == ("True", "False")
    assert default > 4 * 16384 * 0.9  # 4 rounds  # glibc's default: the block is unmapped and faulted in again each time
    assert retained < default / 20
