"""The test server: uvicorn in a thread of the test process, on a free loopback port, for models loaded
from folders; and raw HTTP calls that return the status and JSON of any answer, errors included."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import uvicorn

from gpt2lab.serve.app import build_app, load_models, stop_all
from gpt2lab.serve.schema import Limits


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
