"""A server on a free loopback port, in a thread of the test process, for models made and saved locally
(random weights, GPT-2's BPE, which tiktoken reads offline)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'gpt2lab[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'gpt2lab[serve]'")

from gpt2lab.config import GPTConfig  # noqa: E402
from gpt2lab.model import GPT  # noqa: E402
from gpt2lab.serve.app import build_app, load_models, stop_all  # noqa: E402
from gpt2lab.serve.schema import Limits  # noqa: E402

# GPT-2's layout at toy size; and RoPE + GQA + a sliding window on some layers (the page's band, the ring cache).
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


class RunningServer:
    def __init__(self, served, port: int, api_key: str | None):
        self.served, self.port, self.api_key = served, port, api_key
        self.url = f"http://127.0.0.1:{port}"

    def post(self, path: str, body, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        """(status, JSON answer) of a raw POST: ``body`` bytes are sent as they are, anything else as JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def wait_for(self, condition, timeout: float = 20.0) -> bool:
        """Poll /health until ``condition(health)`` holds; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.get("/health")[1]):
                return True
            time.sleep(0.05)
        return False


@contextmanager
def running_server(model_dirs: dict[str, str], limits: Limits | None = None, api_key: str | None = None, names=None):
    """uvicorn in a thread, bound to 127.0.0.1 on a free port; stopped (and its schedulers ended) on exit."""
    limits = limits or Limits()
    served = load_models({n: model_dirs[n] for n in (names or model_dirs)}, limits)
    app = build_app(served, limits, api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the test server did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(served, port, api_key)
    finally:
        server.should_exit = True
        thread.join(30)
        stop_all(served)


@pytest.fixture(scope="module")
def server(model_dirs):
    """Both models, batches of up to 4, a max_tokens limit of 64: shared by the tests that only read."""
    with running_server(model_dirs, Limits(max_tokens=64, max_batch=4, max_queue=16)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
