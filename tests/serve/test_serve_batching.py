"""The scheduler alone: rows that join a running batch at different steps, leave it early or are cancelled
decode exactly what gpt2lab's own generate gives each of them alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gpt2lab.config import GPTConfig
from gpt2lab.generation import Sampler, generate
from gpt2lab.model import GPT
from gpt2lab.serve.batch_cache import RowSource, prefill, regroup
from gpt2lab.serve.batching import DoneEvent, Row, Scheduler, TokenEvent
from gpt2lab.tokenizer import gpt2_bpe

SHAPES = {
    "learned": dict(n_layer=2, n_head=4, n_embd=32, block_size=96, vocab_size=300),
    # rings of 4 and 7 slots, smaller than most prompts, next to a global layer
    "rope-gqa-window": dict(
        n_layer=3,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        block_size=96,
        vocab_size=300,
        pos_encoding="rope",
        window=[4, None, 7],
    ),
}


class Collector:
    def __init__(self, count: int) -> None:
        self.tokens = {i: [] for i in range(count)}
        self.done: dict[int, DoneEvent] = {}
        self.finished = threading.Event()
        self.count = count

    def emit(self, index: int):
        def record(event) -> None:
            if isinstance(event, TokenEvent):
                self.tokens[index].append(event.token)
            elif isinstance(event, DoneEvent):
                self.done[index] = event
            else:
                self.done[index] = event  # an exception: the test fails on it below
            if len(self.done) == self.count:
                self.finished.set()

        return record


@pytest.mark.parametrize("shape", list(SHAPES))
def test_rows_joining_and_leaving_decode_as_alone(shape):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape])).eval()
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 11, 1, 9, 6, 15)]
    lengths = [20, 7, 25, 12, 3, 18]
    samplers = [
        Sampler(temperature=0),
        Sampler(temperature=0.9, seed=5),
        Sampler(temperature=0),
        Sampler(temperature=1.0, top_p=0.8, seed=11),
        Sampler(temperature=0),
        Sampler(temperature=0),
    ]
    scheduler = Scheduler(model, gpt2_bpe(), max_batch=3, max_queue=16)  # 6 rows: some wait for a slot
    collector = Collector(len(prompts))
    rows = [
        Row(ids=p, max_tokens=n, sampler=s, emit=collector.emit(i))
        for i, (p, n, s) in enumerate(zip(prompts, lengths, samplers, strict=True))
    ]
    # The later waves must arrive while the first decodes, however fast the machine: the worker is held
    # at row 0's first token (it emits from the worker thread) until they have been submitted.
    first_token, later_waves_in = threading.Event(), threading.Event()
    record_row_0 = rows[0].emit

    def hold_at_first_token(event) -> None:
        if isinstance(event, TokenEvent) and not first_token.is_set():
            first_token.set()
            later_waves_in.wait(30)
        record_row_0(event)

    rows[0].emit = hold_at_first_token
    try:
        scheduler.submit(rows[0:2])
        assert first_token.wait(30)
        # the other four arrive while the first two decode: one joins at once (max_batch 3), the rest
        # wait for the slots that rows leaving the batch free
        scheduler.submit(rows[2:4])
        scheduler.submit(rows[4:6])
        later_waves_in.set()
        assert collector.finished.wait(120)
    finally:
        scheduler.stop(30)
    assert scheduler.peak_batch == 3
    for i, prompt in enumerate(prompts):
        s = samplers[i]
        alone = generate(model, [prompt], lengths[i], temperature=s.temperature, top_p=s.top_p, seed=s.seed)[0]
        assert collector.tokens[i] == alone[len(prompt) :], i
        assert collector.done[i] == DoneEvent("length", lengths[i])


def test_a_cancelled_row_leaves_and_the_others_go_on():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES["rope-gqa-window"])).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    collector = Collector(2)
    rows = [
        Row(ids=p, max_tokens=60, sampler=Sampler(temperature=0), emit=collector.emit(i)) for i, p in enumerate(prompts)
    ]
    rows[0].cancelled = True  # as the web layer does when the client goes away
    scheduler = Scheduler(model, gpt2_bpe(), max_batch=2, max_queue=4)
    try:
        scheduler.submit(rows)
        deadline = time.monotonic() + 60
        while 1 not in collector.done and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop(30)
    assert collector.tokens[0] == [] and 0 not in collector.done
    assert collector.tokens[1] == generate(model, [prompts[1]], 60, temperature=0)[0][2:]


def test_regroup_keeps_each_rows_next_logits():
    """Prefill two prompts separately, regroup them into one batch, decode one step: the logits equal
    each prompt's own full forward pass (the independent reference)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES["rope-gqa-window"])).eval()
    a, b = [5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42]
    with torch.no_grad():
        cache_a, _ = prefill(model, [a])
        cache_b, _ = prefill(model, [b])
        cache = regroup(model, [RowSource(cache_a, 0, len(a)), RowSource(cache_b, 0, len(b))], 4)
        step = model(
            torch.tensor([[20], [21]]), cache=cache, position_ids=torch.tensor([[len(a)], [len(b)]]), last_only=True
        )[:, -1]
        want_a = model(torch.tensor([a + [20]]))[0, -1]
        want_b = model(torch.tensor([b + [21]]))[0, -1]
    assert torch.allclose(step[0], want_a, atol=1e-5) and torch.allclose(step[1], want_b, atol=1e-5)
