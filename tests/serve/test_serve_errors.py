"""Every bad request is a 4xx with OpenAI's error object, one line naming the field; the server's own
bounds (body, prompt, max_tokens, queue) answer at once; a client that leaves frees its slot."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'gpt2lab[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'gpt2lab[serve]'")
from serve_helpers import running_server  # noqa: E402

from gpt2lab.serve.schema import Limits  # noqa: E402

LONG_PROMPT = "word " * 200  # 200 tokens: over the test models' context of 128
GOOD = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": None}, 400, "model"),
        ({"model": "gpt5"}, 404, "model"),
        ({"model": "../../etc/passwd"}, 404, "model"),
        ({"prompt": None}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": 42}, 400, "prompt"),
        ({"prompt": LONG_PROMPT}, 400, "prompt"),
        ({"prompt": "word " * 100, "max_tokens": 60}, 400, "max_tokens"),
        ({"max_tokens": "5"}, 400, "max_tokens"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 65}, 400, "max_tokens"),
        ({"temperature": -0.5}, 400, "temperature"),
        ({"temperature": "hot"}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"stop": ""}, 400, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"seed": 1.5}, 400, "seed"),
        ({"logprobs": 21}, 400, "logprobs"),
        ({"logprobs": -1}, 400, "logprobs"),
        ({"stream": "yes"}, 400, "stream"),
        ({"n": 2}, 400, "n"),
        ({"echo": True}, 400, "echo"),
        ({"max_token": 5}, 400, "max_token"),
    ],
)
def test_bad_field_is_a_4xx_naming_it(server, change, status, param):
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    got, answer = server.post("/v1/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert error["param"] == param
    assert "\n" not in error["message"] and param in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "JSON object")],
)
def test_a_body_that_is_not_a_json_object_is_a_400(server, body, message):
    status, answer = server.post("/v1/completions", body)
    assert status == 400 and message in answer["error"]["message"]


def test_a_body_over_the_limit_is_a_413_before_it_is_read(model_dirs):
    with running_server(model_dirs, Limits(max_body_bytes=1000), names=["tiny"]) as server:
        status, answer = server.post("/v1/completions", {**GOOD, "prompt": "x" * 2000})
        assert status == 413 and "1000 bytes" in answer["error"]["message"]
        assert server.post("/v1/completions", GOOD)[0] == 200
        # a chunked upload has no Content-Length: it is cut off as it arrives
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        chunks = (json.dumps({**GOOD, "prompt": "x" * 2000})[i : i + 500].encode() for i in range(0, 2100, 500))
        connection.request("POST", "/v1/completions", chunks, {"Content-Type": "application/json"},
                           encode_chunked=True)  # fmt: skip
        response = connection.getresponse()
        assert response.status == 413 and "1000 bytes" in json.loads(response.read())["error"]["message"]


def test_unknown_route_and_method_are_json_errors(server):
    assert server.get("/v1/chat/nothing")[0] == 404
    status, answer = server.get("/v1/completions")
    assert status == 405 and "GET /v1/completions" in answer["error"]["message"]


def test_attention_view_refuses_a_layer_or_head_out_of_range(server):
    status, answer = server.post("/v1/attention", {"model": "tiny", "prompt": "Hi there", "layer": 2})
    assert status == 400 and answer["error"]["param"] == "layer"
    status, answer = server.post("/v1/attention", {"model": "tiny", "prompt": "Hi there", "head": 4})
    assert status == 400 and answer["error"]["param"] == "head"


def test_api_key_is_required_when_set(model_dirs):
    openai = pytest.importorskip("openai")
    key = "s3cret-key-for-tests"
    with running_server(model_dirs, api_key=key, names=["tiny"]) as server:
        status, answer = server.post("/v1/completions", GOOD)
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        assert server.post("/v1/completions", GOOD, {"Authorization": "Bearer wrong"})[0] == 401
        assert server.post("/v1/completions", GOOD, {"Authorization": f"Bearer {key}"})[0] == 200
        assert server.get("/health")[0] == 200  # a probe needs no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        assert good.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1


def _open_stream(server, body: dict) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return connection


def test_a_full_queue_answers_429_at_once(model_dirs):
    limits = Limits(max_batch=1, max_queue=1, max_tokens=100_000)
    with running_server(model_dirs, limits, names=["windowed"]) as server:
        long = {"model": "windowed", "prompt": "Hi", "max_tokens": 100_000, "stream": True}
        first = _open_stream(server, long)
        assert server.wait_for(lambda h: h["models"]["windowed"]["active"] == 1)
        second = _open_stream(server, long)
        assert server.wait_for(lambda h: h["models"]["windowed"]["waiting"] == 1)
        status, answer = server.post("/v1/completions", {**long, "stream": False}, timeout=10)
        assert status == 429 and answer["error"]["code"] == "queue_full"
        first.close()
        second.close()
        # both clients left: their rows are dropped, the long generations do not run on
        assert server.wait_for(
            lambda h: h["models"]["windowed"] == {**h["models"]["windowed"], "active": 0, "waiting": 0}, timeout=10
        )


def test_a_client_that_disconnects_mid_stream_frees_its_slot(model_dirs):
    limits = Limits(max_batch=1, max_tokens=100_000)
    with running_server(model_dirs, limits, names=["windowed"]) as server:
        connection = _open_stream(server, {"model": "windowed", "prompt": "Hi", "max_tokens": 100_000, "stream": True})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: {")
        connection.close()  # 100,000 tokens would take minutes
        assert server.wait_for(lambda h: h["models"]["windowed"]["active"] == 0, timeout=10)
        # the freed slot serves the next request (max_batch is 1)
        status, answer = server.post("/v1/completions", {"model": "windowed", "prompt": "Hi", "max_tokens": 3})
        assert status == 200 and answer["usage"]["completion_tokens"] == 3


def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_frees_its_slot(model_dirs):
    limits = Limits(max_batch=1, max_tokens=100_000)
    with running_server(model_dirs, limits, names=["windowed"]) as server:
        connection = _open_stream(server, {"model": "windowed", "prompt": "Hi", "max_tokens": 100_000})
        assert server.wait_for(lambda h: h["models"]["windowed"]["active"] == 1)
        threading.Timer(0.2, connection.close).start()
        assert server.wait_for(lambda h: h["models"]["windowed"]["active"] == 0, timeout=10)
