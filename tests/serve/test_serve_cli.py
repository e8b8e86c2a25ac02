"""``gpt2lab serve`` as a user starts it: a subprocess on loopback that SIGTERM stops gracefully, and the
one-line refusals (no extra installed, a public address without a key, a bad --model)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2lab.cli.main import main

SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail("the server did not come up")


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_exits(model_dirs):
    pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'gpt2lab[serve]'")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "GPT2LAB_API_KEY": ""}
    command = [
        sys.executable,
        "-m",
        "gpt2lab",
        "serve",
        "--model",
        f"w={model_dirs['windowed']}",
        "--port",
        str(port),
        "--max-tokens",
        "5000",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(port, process)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"model": "w", "prompt": "Hi", "max_tokens": 3000, "temperature": 0, "stream": True}
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.readline().startswith(b"data: {")
        process.send_signal(signal.SIGTERM)
        events = [line for line in response.read().decode().split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        finish = json.loads(events[-2].removeprefix("data: "))["choices"][0]
        assert finish["finish_reason"] == "length" and len(events) >= 3000  # every token came, then the end
        assert process.wait(timeout=60) == 0
        with pytest.raises(OSError):  # nothing listens any more
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys, model_dirs):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    assert main(["serve", model_dirs["tiny"]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'gpt2lab[serve]'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--host", "0.0.0.0", "M"], "needs --api-key or $GPT2LAB_API_KEY"),
        (["serve", "--host", "192.168.1.5", "--api-key", "short", "M"], "at least 8 characters"),
        (["serve", "--model", "nameonly"], "NAME=PATH"),
        (["serve", "--model", "a=x", "--model", "a=y"], "given twice"),
        (["serve"], "needs a model"),
    ],
)
def test_refusals_are_one_line(monkeypatch, capsys, argv, message):
    monkeypatch.delenv("GPT2LAB_API_KEY", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_a_model_that_does_not_load_is_one_line(capsys, tmp_path):
    pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'gpt2lab[serve]'")
    assert main(["serve", "--model", f"x={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
