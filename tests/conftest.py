from pathlib import Path

import pytest
import torch

# The shared data folder sits next to the checkout (tests and benchmarks only; the product never reads it).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA
