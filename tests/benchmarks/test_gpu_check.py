"""scripts/gpu-check.sh is never run by the tests; they check that it parses and, on a machine without CUDA,
stops at once with one clear line instead of failing halfway."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run the whole check")
def test_without_cuda_it_stops_with_one_line():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no CUDA device visible to {sys.executable} (torch.cuda.is_available() is False): "
        "the GPU check needs one"
    ]
