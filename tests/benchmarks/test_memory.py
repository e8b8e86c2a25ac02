import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from memory import peak_memory, reset_peak_memory  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")

MIB = 2**20


def test_peak_sees_a_transient_allocation_and_forgets_it_after_a_reset():
    before = reset_peak_memory()
    block = torch.ones(256 * MIB // 4)  # 256 MiB, touched page by page
    del block
    grown = peak_memory() - before
    assert 240 * MIB < grown < 400 * MIB

    before = reset_peak_memory()
    small = torch.ones(16 * MIB // 4)
    del small
    # Without the reset (and the heap trim) the old 256 MiB high-water mark would still be read.
    assert peak_memory() - before < 64 * MIB
