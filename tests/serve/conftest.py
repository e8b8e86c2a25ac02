"""Models made and saved locally for the serve tests (random weights, GPT-2's BPE, which tiktoken reads
offline), and a server for them shared by the tests that only read (see serve_helpers.py)."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT

SERVE_EXTRA = "the serve extra is not installed: pip install 'gpt2lab[serve]'"
# GPT-2's layout at toy size; and RoPE + GQA + a sliding window on every layer (the page's band, the ring
# cache, and a rolling cache whose generations are not bounded by the context).
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=128)
WINDOWED = dict(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, block_size=128, pos_encoding="rope", window=[6, 6, 6])


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for name, shape in (("tiny", TINY), ("windowed", WINDOWED)):
        torch.manual_seed(1234)
        folder = tmp_path_factory.mktemp(name)
        GPT(GPTConfig(**shape)).save_pretrained(folder)
        dirs[name] = str(folder)
    return dirs


@pytest.fixture(scope="module")
def server(model_dirs):
    """Both models, batches of up to 4, a max_tokens limit of 64: shared by the tests that only read."""
    pytest.importorskip("fastapi", reason=SERVE_EXTRA)
    pytest.importorskip("uvicorn", reason=SERVE_EXTRA)
    from serve_helpers import running_server

    from gpt2lab.serve.schema import Limits

    with running_server(model_dirs, Limits(max_tokens=64, max_batch=4, max_queue=16)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
