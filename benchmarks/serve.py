"""``gpt2lab serve`` under load: throughput and latency for 1, 4 and 16 concurrent clients, continuous
batching (``--max-batch 16``) against one request at a time (``--max-batch 1``), in the same run.

Both servers run side by side on loopback (an idle one costs nothing), loaded with the same model: the
GPT-2 124M shape with random weights by default (``--shape tiny`` for a quick check). Levels run in
turn, batched then one-at-a-time at each level, so that a load spike on the shared cores hits both
sides of a comparison. Every client sends ``--requests-per-client`` greedy completions of
``--max-tokens`` tokens, one after the other, through the standard library's HTTP client.

Bounded: at most ``--time-limit`` seconds in all (no new request starts after it; the table then says
how many ran), each request at most 600 s, loopback only.

    python benchmarks/serve.py [--shape gpt2|tiny] [--max-tokens 32] [--requests-per-client 2]
        [--threads 2] [--time-limit 1200] [--out benchmarks/results/serve-DATE.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average  # noqa: E402

from gpt2lab import GPT, GPTConfig  # noqa: E402
from gpt2lab.files import write_text  # noqa: E402

LEVELS = (1, 4, 16)
MODES = {"batched": 16, "one at a time": 1}  # mode -> --max-batch
PROMPTS = [
    "The history of the city begins with",
    "In the morning the committee decided to",
    "Researchers measured the temperature of the",
    "She opened the letter and read that",
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "gpt2lab", "serve", "--model", f"bench={model_dir}", "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", "64", "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "GPT2LAB_API_KEY": ""}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server stopped: {process.stderr.read().strip()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not come up within 300 s")


def one_request(url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one greedy completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def run_level(url: str, clients: int, per_client: int, max_tokens: int, deadline: float) -> dict:
    """``clients`` threads, each sending ``per_client`` requests in turn; latencies, tokens, failures."""
    latencies, tokens, failures = [], [], []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(per_client):
            if time.monotonic() > deadline:
                return
            try:
                seconds, count = one_request(url, PROMPTS[(index + k) % len(PROMPTS)], max_tokens)
                with lock:
                    latencies.append(seconds)
                    tokens.append(count)
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures.append(f"{type(err).__name__}: {err}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall": wall, "latencies": latencies, "tokens": sum(tokens), "failures": failures}


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def row(clients: int, mode: str, result: dict) -> str:
    lat = result["latencies"] or [float("nan")]
    return (f"| {clients:>2} | {mode:<13} | {len(result['latencies']):>3} | {len(result['failures']):>3} | "
            f"{result['tokens'] / result['wall']:>8.1f} | {len(result['latencies']) / result['wall']:>6.2f} | "
            f"{percentile(lat, 50):>7.2f} | {percentile(lat, 95):>7.2f} |")  # fmt: skip


def make_model(shape: str, folder: str) -> str:
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2") if shape == "gpt2" else GPTConfig.from_preset("tiny")
    GPT(config).save_pretrained(folder)
    return f"{shape} shape ({config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}), random weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("gpt2", "tiny"), default="gpt2")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--time-limit", type=float, default=1200.0, help="seconds for the whole run")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it")
    deadline = time.monotonic() + args.time_limit
    lines = [
        f"CPU: {cpu_name()} ({os.cpu_count()} cores seen); torch {torch.__version__}, "
        f"{args.threads} threads per server",
        f"load average at start: {load_average()} (the cores are shared with other work)",
    ]
    with tempfile.TemporaryDirectory(prefix="gpt2lab-serve-bench-") as folder:
        lines.append(f"model: {make_model(args.shape, folder)}")
        lines.append(f"each client: {args.requests_per_client} greedy completions of {args.max_tokens} tokens in turn")
        lines += ["", "| clients | mode | requests | failed | tokens/s | req/s | p50 s | p95 s |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        servers = {mode: start_server(folder, batch, args.threads) for mode, batch in MODES.items()}
        try:
            for _, url in servers.values():  # warm up: first calls measure kernels, allocate caches
                run_level(url, 16, 1, 2, deadline)
            results = {}
            for clients in LEVELS:
                for mode, (_, url) in servers.items():
                    results[clients, mode] = run_level(
                        url, clients, args.requests_per_client, args.max_tokens, deadline
                    )
                    lines.append(row(clients, mode, results[clients, mode]))
                    print(lines[-1], flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(60)
    lines.append("")
    for clients in LEVELS:
        b, s = results[clients, "batched"], results[clients, "one at a time"]
        speedup = (b["tokens"] / b["wall"]) / (s["tokens"] / s["wall"])
        lines.append(f"{clients:>2} clients: batched throughput {speedup:.2f}x one at a time")
    failed = sum(len(r["failures"]) for r in results.values())
    lines.append(f"failed requests: {failed}; load average at end: {load_average()}")
    lines += sorted({f for r in results.values() for f in r["failures"]})[:5]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        write_text(args.out, report)


if __name__ == "__main__":
    main()
