"""One run of a variant study, in its own process: train (or resume), then evaluate on the study's
evaluation tokens, which are the same for every run. :class:`Runs` starts them, keeps finished ones.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import queue as queue_module
import resource
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab.data.tokens import TokenData
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval.loss import evaluate
from gpt2lab.files import read_json, write_text
from gpt2lab.loading import load_model
from gpt2lab.outputs import CKPT_NAME, RESULT_FILE
from gpt2lab.study.context_use import loss_by_cut
from gpt2lab.study.continuation import seed_continuation
from gpt2lab.study.extrapolation import extrapolate
from gpt2lab.train.config import TrainConfig, upgrade_train_fields
from gpt2lab.train.loop import train
from gpt2lab.train.run import read_metrics

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def _child(queue, threads, fn, args) -> None:
    _stop_with_parent()
    torch.set_num_threads(threads)
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report any failure to the parent as one line
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _stop_with_parent() -> None:
    """Linux: ask for SIGTERM when the study process dies (killed, or closed with its terminal). Training
    then saves a checkpoint and stops, instead of running on, orphaned, beside a re-run of the study."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != multiprocessing.parent_process().pid:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


class OutOfTime(GPT2LabError):
    """The study's time budget (``--max-minutes``) ran out: the run stopped at a checkpoint, or never began."""


def run_isolated(fn, *args, threads: int | None = None, deadline: float | None = None):
    """``fn(*args)`` in a fresh process on ``threads`` threads (default: this process's count): its memory
    peak is its own, and a crash cannot take the study. Past ``deadline`` (time.monotonic()) the process
    gets SIGTERM, as from Ctrl-C: training saves a checkpoint and stops, and :class:`OutOfTime` is raised."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, threads or torch.get_num_threads(), fn, args))
    process.start()
    stopped = False
    while True:  # a child killed outright (kill -9, out of memory) reports nothing: do not wait for it forever
        try:
            status, value = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive() and queue.empty():
                status, value = "error", f"its process ended (exit code {process.exitcode}) without a result"
                break
            if deadline is not None and not stopped and time.monotonic() > deadline:
                process.terminate()
                stopped = True
    process.join()
    if status != "ok":
        error = OutOfTime if stopped else GPT2LabError
        raise error(f"{getattr(fn, '__name__', fn)} failed: {value}")
    return value


def eval_tokens(data_dir: str, context: int, max_tokens: int | None) -> np.ndarray:
    """The study's evaluation tokens: the validation split's first whole windows of ``context`` (all of
    them, or as many as ``max_tokens`` allows), + 1 target. Every run and baseline is scored on these."""
    val = np.asarray(TokenData.open(data_dir).val)
    budget = len(val) - 1 if max_tokens is None else min(len(val) - 1, max_tokens)
    return val[: (budget // context) * context + 1]


def fingerprint_tokens(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:16]


def _tokens_per_second(rows: list[dict], tokens_per_step: int) -> float:
    """Median training throughput over logged steps (the first few include warm-up and are skipped)."""
    dts = [r["dt"] for r in rows if "dt" in r]
    dts = dts[min(3, len(dts) - 1) :]
    return tokens_per_step / statistics.median(dts) if dts else float("nan")


def train_and_measure(train_fields: dict[str, Any], settings: dict[str, Any], run_dir: str) -> dict:
    """Train (resuming if a checkpoint exists), evaluate, and write ``result.json``. Own process."""
    cfg = TrainConfig(**train_fields)
    cfg.validate()
    if settings.get("continue_from"):  # uptraining: start from the baseline's final state (see continuation)
        source = settings["continue_from"]
        seed_continuation(source["base_dir"], run_dir, cfg.to_dict(), source["n_kv_head"], source["init"])
    # the run folder is named VARIANT-sSEED: the trackers of cfg.log_to show each run under that name
    summary = train(cfg, resume=(Path(run_dir) / CKPT_NAME).is_file(), run_name=Path(run_dir).name)
    if summary["stopped"]:  # a signal (Ctrl-C, kill): the checkpoint is saved; the run is not finished
        raise GPT2LabError(f"{run_dir} stopped at step {summary['step']} by a signal: run the study again to resume")
    model = load_model(run_dir).eval()
    tokens = eval_tokens(cfg.data_dir, cfg.seq_len, settings["max_tokens"])
    result = evaluate(model, tokens, context=cfg.seq_len)
    # only this training's rows: a step past the run's last would be another run's leftover
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= summary["step"]]
    tok_s = _tokens_per_second(rows, cfg.grad_accum * cfg.batch_size * cfg.seq_len)
    out = {
        "fields": train_fields,
        "val_loss": result.loss,
        "eval_tokens": result.tokens,
        "eval_sha": fingerprint_tokens(tokens),
        "train_tok_s": tok_s,
        "step_ms": 1e3 * cfg.grad_accum * cfg.batch_size * cfg.seq_len / tok_s,
        "peak_mib": _peak_memory_mib(),
        "by_position": result.by_position.tolist(),
        "val_curve": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
        "steps": summary["step"],
    }
    val = np.asarray(TokenData.open(cfg.data_dir).val)
    if settings.get("context_targets"):
        out["context_use"] = loss_by_cut(model, val, cfg.seq_len, settings["context_targets"])
    if settings.get("extrapolation") is not None:
        out["extrapolation"] = extrapolate(model, val, cfg.seq_len, settings["extrapolation"])
    write_text(Path(run_dir) / RESULT_FILE, json.dumps(out) + "\n")
    return out


def _peak_memory_mib() -> float:
    """Peak memory of this run's process: the accelerator's allocations on CUDA, else the resident set
    (which includes the Python interpreter and torch itself, about the same for every variant)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Runs:
    """Starts runs ``parallel`` at a time, each on an equal share of the threads, in ``runs_dir/NAME-sSEED``.

    A run folder with a ``result.json`` made from the same fields is finished and kept; one made from
    other fields is refused (the study folder checks this as a whole; this catches a hand-edited run).
    """

    def __init__(self, runs_dir: Path, base_fields: dict, settings: dict, parallel: int, log, deadline=None) -> None:
        self.runs_dir, self.base_fields, self.settings, self.log = runs_dir, base_fields, settings, log
        self.pool = ThreadPoolExecutor(max_workers=parallel)
        self.threads = max(1, torch.get_num_threads() // parallel)
        self.deadline = deadline  # time.monotonic() past which no run starts and running ones checkpoint and stop
        self.missing: list[str] = []  # runs this call did not finish (out of time), for the report
        self.durations: list[float] = []  # wall seconds of the runs this call trained

    def out_of_time(self, expected: float = 0.0) -> bool:
        """Past the deadline, or (``expected`` seconds of work) would be: a run is not started that the
        budget cannot finish, judged by the median wall time of the runs this call has trained."""
        return self.deadline is not None and time.monotonic() + expected > self.deadline

    def run(self, name: str, seed: int, fields: dict[str, Any], settings: dict | None = None) -> dict | None:
        """The run's result, or None when the time budget ran out before it finished (it resumes next call)."""
        run_dir = self.runs_dir / f"{name}-s{seed}"
        # as result.json will hold them (JSON has lists, not tuples), so a finished run compares equal
        train_fields = json.loads(json.dumps({**self.base_fields, **fields, "seed": seed, "out_dir": str(run_dir)}))
        done = run_dir / RESULT_FILE
        if done.is_file():
            result = read_json(done)
            if upgrade_train_fields(result.get("fields") or {}, str(self.runs_dir)) != train_fields:
                raise GPT2LabError(f"{run_dir} holds a run of other settings; remove it or use a new --out")
            self.log(f"[study] {run_dir.name}: done earlier, kept")
            return result
        if self.out_of_time(statistics.median(self.durations) if self.durations else 0.0):
            self.missing.append(run_dir.name)
            return None
        self.log(f"[study] {run_dir.name}: training")
        start = time.monotonic()
        try:
            result = run_isolated(
                train_and_measure,
                train_fields,
                settings or self.settings,
                str(run_dir),
                threads=self.threads,
                deadline=self.deadline,
            )
            self.durations.append(time.monotonic() - start)
            return result
        except OutOfTime:
            self.log(f"[study] {run_dir.name}: out of time, stopped at a checkpoint (the next call resumes it)")
            self.missing.append(run_dir.name)
            return None

    def many(self, jobs: list[tuple], settings: dict | None = None) -> list[dict | None]:
        """The results of ``(name, seed, fields[, settings])`` runs, in order. All go to the pool at once, so no core
        waits for the last seed of one variant before the next variant starts."""
        return list(self.pool.map(lambda job: self.run(*job[:3], job[3] if len(job) > 3 else settings), jobs))

    def isolated(self, fn, *args):
        return run_isolated(fn, *args, threads=self.threads, deadline=self.deadline)

    def close(self) -> None:
        self.pool.shutdown()
