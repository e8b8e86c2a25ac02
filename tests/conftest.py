from pathlib import Path

import pytest
import torch

import gpt2lab.kernels.choice as kernel_choice
from gpt2lab.data.tokens import prepare

# The shared data folder sits next to the checkout (tests and benchmarks only; the product never reads it).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    """Test models are small or decode one token at a time: a second thread buys little, and on a shared
    machine OpenMP threads waiting for a busy core slow them down tens of times."""
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The embedded pydoc corpus, prepared once per test session (~140k tokens, a few seconds)."""
    out = tmp_path_factory.mktemp("pydoc")
    prepare("pydoc", out)
    return out


@pytest.fixture
def fresh_kernel_choices(monkeypatch):
    """Each test measures (or pins) its own kernel choices: a choice cached by another test would hide a path."""
    monkeypatch.delenv(kernel_choice.ENV, raising=False)
    kernel_choice.forget()
    yield
    kernel_choice.forget()
