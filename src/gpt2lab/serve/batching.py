"""The batching scheduler: one worker thread per served model, continuous batching.

Policy: **join at the next step**. A request that arrives while others decode waits only until the
current decoding step ends; then it is prefilled (with the other newcomers, as one left-padded batch) and
its rows join the running batch (:func:`~gpt2lab.serve.batch_cache.regroup`). A row leaves the batch as
soon as it finishes or its client goes away, which frees its slot for the next waiting row. At most
``max_batch`` rows decode together; at most ``max_queue`` wait, and a request that would overflow the
queue is refused at once (:class:`QueueFull`) instead of waiting without bound.

Each row samples with its own :class:`~gpt2lab.generation.Sampler` and its own random generator (so a
``seed`` gives the same text whatever else shares the batch) and reports its tokens through ``emit``,
a callback the web layer turns into an HTTP response.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2lab.generation import Sampler, StopStrings
from gpt2lab.serve.batch_cache import RowSource, prefill, regroup


class QueueFull(Exception):
    """The wait queue has no room for the request: the server answers 429."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work: the server answers 503."""


@dataclass
class TokenEvent:
    """One generated token: the text it releases (held back while it may begin a stop string) and,
    when asked for, its log-probability and the top ``logprobs`` alternatives."""

    text: str
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" (end of text, stop string) or "length" (max_tokens reached)
    completion_tokens: int


@dataclass
class Row:
    """One prompt of one request, from the queue to its last token."""

    ids: list[int]
    max_tokens: int
    sampler: Sampler
    emit: Callable[[object], None]
    stop_strings: list[str] = field(default_factory=list)
    stop_tokens: frozenset[int] = frozenset()
    logprobs: int | None = None
    cancelled: bool = False  # set by the web layer when the client goes away
    # decoding state, owned by the worker
    produced: int = 0
    n_real: int = 0
    last_token: int = -1
    logits: torch.Tensor | None = None
    done: bool = False
    text: StopStrings | None = None
    released: int = 0
    generator: torch.Generator | None = None


class Scheduler:
    """Owns one model: queues rows, admits them into the running batch, decodes, and reports tokens."""

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.model_lock = threading.Lock()  # held during every model call: the attention view shares it
        self._waiting: deque[Row] = deque()
        self._active: list[Row] = []
        self._cache = None
        self.peak_batch = 0  # the most rows that ever decoded together (the health route reports it)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gpt2lab-serve-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from the web layer
    def submit(self, rows: list[Row]) -> None:
        with self._wake:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) + len(rows) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting prompts); retry later")
            self._waiting.extend(rows)
            self._wake.notify()

    def load(self) -> dict[str, int]:
        return {"active": len(self._active), "waiting": len(self._waiting), "peak_batch": self.peak_batch}

    def stop(self, timeout: float | None = None) -> None:
        """Finish the rows already accepted, then end the worker thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._waiting and not self._active and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._waiting and not self._active:
                    return
                joining = self._take_waiting()
            try:
                with self.model_lock:
                    self._iteration(joining)
            except Exception as err:  # a failure ends the rows it touched, never the worker
                for row in self._active + joining:
                    _finish_with_error(row, err)
                self._active, self._cache = [], None

    def _take_waiting(self) -> list[Row]:
        rows = []
        while self._waiting and len(self._active) + len(rows) < self.max_batch:
            row = self._waiting.popleft()
            if not row.cancelled:
                rows.append(row)
        return rows

    def _iteration(self, joining: list[Row]) -> None:
        """Admit ``joining``, sample one token for every row, drop finished rows, run one decoding step."""
        sources = [RowSource(self._cache, i, row.n_real) for i, row in enumerate(self._active)]
        if joining:
            cache, logits = prefill(self.model, [row.ids for row in joining])
            for i, row in enumerate(joining):
                _start(row, logits[i], self.model.device)
                sources.append(RowSource(cache, i, row.n_real))
        rows = self._active + joining
        for row in rows:
            if not row.cancelled:
                self._sample(row)
        keep = [i for i, row in enumerate(rows) if not row.done and not row.cancelled]
        if joining or len(keep) != len(rows):
            remaining = max((rows[i].max_tokens - rows[i].produced for i in keep), default=0)
            self._cache = regroup(self.model, [sources[i] for i in keep], remaining) if keep else None
        self._active = [rows[i] for i in keep]
        self.peak_batch = max(self.peak_batch, len(self._active))
        if self._active:
            self._step()

    def _step(self) -> None:
        device = self.model.device
        tokens = torch.tensor([[row.last_token] for row in self._active], device=device)  # (B, 1)
        positions = torch.tensor([[row.n_real] for row in self._active], device=device)  # real tokens so far
        logits = self.model(tokens, cache=self._cache, position_ids=positions, last_only=True)[:, -1]
        for i, row in enumerate(self._active):
            row.logits, row.n_real = logits[i], row.n_real + 1

    def _sample(self, row: Row) -> None:
        """Draw the row's next token from its pending logits and report it (and the end, if it ends)."""
        logits = row.logits[None].float()  # (1, vocab)
        token = int(row.sampler(logits, row.generator)[0])
        row.produced += 1
        row.last_token = token
        logprob = top = None
        if row.logprobs is not None:
            logprobs = torch.log_softmax(logits[0], dim=-1)
            logprob = float(logprobs[token])
            values, ids = torch.topk(logprobs, row.logprobs)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        finish = None
        if token in row.stop_tokens:
            finish = "stop"
        elif row.text.feed(self.tokenizer.decode_bytes([token])):
            finish = "stop"
        elif row.produced >= row.max_tokens:
            finish = "length"
        row.emit(TokenEvent(_release(row, finish is not None), token, logprob, top))
        if finish is not None:
            row.done = True
            row.emit(DoneEvent(finish, row.produced))


def _start(row: Row, logits: torch.Tensor, device) -> None:
    row.n_real, row.logits = len(row.ids), logits
    row.text = StopStrings(row.stop_strings)
    row.generator = row.sampler.generator(device)


def _release(row: Row, final: bool) -> str:
    """The row's text that is now safe to show: up to a found stop string, or all of it at the end."""
    text = row.text
    end = text.found if text.found is not None else len(text.data) if final else text.safe_end()
    if end <= row.released:
        return ""
    piece = text.data[row.released : end].decode("utf-8", errors="replace")
    row.released = end
    return piece


def _finish_with_error(row: Row, err: Exception) -> None:
    if not row.done:
        row.done = True
        row.emit(err)
