"""One completion request from its checked body to OpenAI's answer: rows handed to the scheduler, their
tokens gathered (or streamed as server-sent events), and the ``text_completion`` objects OpenAI's clients
read. A client that goes away cancels its rows, which frees their batch slots at the next step."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gpt2lab.generation import Sampler
from gpt2lab.serve.batching import DoneEvent, QueueFull, Row, Scheduler, ShuttingDown, TokenEvent
from gpt2lab.serve.schema import APIError, CompletionRequest, Limits


@dataclass
class ServedModel:
    """A model loaded at start, under the name requests use."""

    name: str
    model: object
    tokenizer: object
    scheduler: Scheduler
    created: int

    def info(self) -> dict:
        c = self.model.config
        windows = [c.layer_window(i) for i in range(c.n_layer)]
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "gpt2lab",
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_kv_head": c.n_kv_head,
            "block_size": c.block_size,
            "pos_encoding": c.pos_encoding,
            "windows": windows,
            "vocab_size": c.vocab_size,
        }


def prompt_limit(config, limits: Limits) -> int:
    return limits.max_prompt_tokens or config.block_size


def encode_prompts(served: ServedModel, request: CompletionRequest, limits: Limits) -> list[list[int]]:
    """Token ids of each prompt, checked against the prompt limit and the model's context."""
    tok, config = served.tokenizer, served.model.config
    eot = getattr(tok, "eot_token", None)
    # Every layer windowed and RoPE positions: the cache rolls and positions go on, so only the prompt
    # itself is bounded. Else (a global layer, or learned positions) the whole sequence must fit the context.
    rolling = None not in config.layer_windows() and config.pos_encoding == "rope"
    prompts = []
    for i, text in enumerate(request.prompt):
        try:
            ids = tok.encode(text, allowed_special={"<|endoftext|>"}) if eot is not None else tok.encode(text)
        except ValueError as err:  # a character model meets a character it never saw
            raise APIError(400, f"prompt: {err}", "prompt") from None
        where = f"prompt[{i}]" if len(request.prompt) > 1 else "prompt"
        if len(ids) > prompt_limit(config, limits):
            raise APIError(
                400,
                f"{where}: {len(ids)} tokens, over the limit of {prompt_limit(config, limits)}",
                "prompt",
                code="context_length_exceeded",
            )
        if not rolling and len(ids) + request.max_tokens > config.block_size:
            raise APIError(
                400,
                f"max_tokens: {where} has {len(ids)} tokens and {request.max_tokens} more do not "
                f"fit the context of {config.block_size}",
                "max_tokens",
                code="context_length_exceeded",
            )
        prompts.append(ids)
    return prompts


def check_request(served: ServedModel, request: CompletionRequest, limits: Limits) -> list[list[int]]:
    if request.max_tokens > limits.max_tokens:
        raise APIError(
            400, f"max_tokens: {request.max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens"
        )
    if len(request.prompt) > limits.max_queue:
        raise APIError(400, f"prompt: {len(request.prompt)} prompts, over the queue's {limits.max_queue}", "prompt")
    if request.logprobs is not None and request.logprobs > served.model.config.vocab_size:
        raise APIError(400, "logprobs: more than the vocabulary", "logprobs")
    return encode_prompts(served, request, limits)


def submit(
    served: ServedModel, request: CompletionRequest, prompts: list[list[int]]
) -> tuple[list[Row], asyncio.Queue]:
    """Queue one row per prompt; their events arrive on the returned queue as (row index, event)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    tok = served.tokenizer
    eot = getattr(tok, "eot_token", None)
    sampler = Sampler(temperature=request.temperature, top_p=request.top_p, seed=request.seed)

    def emitter(index: int):
        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        return emit

    rows = [
        Row(
            ids=ids,
            max_tokens=request.max_tokens,
            sampler=sampler,
            emit=emitter(i),
            stop_strings=request.stop,
            stop_tokens=frozenset([] if eot is None else [eot]),
            logprobs=request.logprobs,
        )
        for i, ids in enumerate(prompts)
    ]
    try:
        served.scheduler.submit(rows)
    except QueueFull as err:
        raise APIError(429, str(err), None, "rate_limit_error", "queue_full") from None
    except ShuttingDown as err:
        raise APIError(503, str(err), None, "server_error", "shutting_down") from None
    return rows, events


def _logprobs_entry(tok, event: TokenEvent, offset: int) -> dict:
    def text(token: int) -> str:
        return tok.decode_bytes([token]).decode("utf-8", errors="replace")

    return {
        "tokens": [text(event.token)],
        "token_logprobs": [event.logprob],
        "top_logprobs": [{text(t): lp for t, lp in event.top}],
        "text_offset": [offset],
    }


def _merge_logprobs(parts: list[dict]) -> dict | None:
    if not parts:
        return None
    return {key: [v for part in parts for v in part[key]] for key in parts[0]}


def _choice(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _header(served: ServedModel, request_id: str) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": served.name}


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


class _Events:
    """The rows' events, in order, with a look every half second at whether the client is still there
    (events may arrive faster than that, so the look is timed, not left to a lull)."""

    def __init__(self, events: asyncio.Queue, is_disconnected) -> None:
        self.events, self.is_disconnected = events, is_disconnected
        self.checked = time.monotonic()

    async def next(self) -> tuple[int, object]:
        while True:
            if time.monotonic() - self.checked > 0.5:
                self.checked = time.monotonic()
                if await self.is_disconnected():
                    raise ClientGone
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                continue


async def complete(served: ServedModel, rows: list[Row], events: asyncio.Queue, is_disconnected) -> dict:
    """The whole answer once every row has finished."""
    events = _Events(events, is_disconnected)
    texts, logprobs = [[] for _ in rows], [[] for _ in rows]
    finish, produced, pending = [None] * len(rows), [0] * len(rows), len(rows)
    try:
        while pending:
            index, event = await events.next()
            if isinstance(event, Exception):
                raise APIError(500, f"generation failed: {event}", None, "server_error")
            if isinstance(event, TokenEvent):
                if event.logprob is not None:
                    offset = sum(len(t) for t in texts[index])
                    logprobs[index].append(_logprobs_entry(served.tokenizer, event, offset))
                texts[index].append(event.text)
            elif isinstance(event, DoneEvent):
                finish[index], produced[index], pending = event.finish_reason, event.completion_tokens, pending - 1
    finally:
        for row in rows:
            row.cancelled = True  # no-op for finished rows; frees the slots of a client that left
    choices = [_choice(i, "".join(texts[i]), _merge_logprobs(logprobs[i]), finish[i]) for i in range(len(rows))]
    prompt_tokens, completion_tokens = sum(len(r.ids) for r in rows), sum(produced)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {**_header(served, f"cmpl-{uuid.uuid4().hex}"), "choices": choices, "usage": usage}


async def stream(served: ServedModel, rows: list[Row], events: asyncio.Queue, is_disconnected) -> AsyncIterator[str]:
    """Server-sent events: one chunk per token (its released text, logprobs when asked), a last chunk per
    prompt with its finish reason, then ``data: [DONE]``."""
    header = _header(served, f"cmpl-{uuid.uuid4().hex}")
    events = _Events(events, is_disconnected)
    offsets, pending = [0] * len(rows), len(rows)
    try:
        while pending:
            index, event = await events.next()
            if isinstance(event, Exception):
                error = APIError(500, f"generation failed: {event}", None, "server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            if isinstance(event, TokenEvent):
                lp = None if event.logprob is None else _logprobs_entry(served.tokenizer, event, offsets[index])
                offsets[index] += len(event.text)
                choice = _choice(index, event.text, lp, None)
            else:
                choice, pending = _choice(index, "", None, event.finish_reason), pending - 1
            yield f"data: {json.dumps({**header, 'choices': [choice]})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for row in rows:
            row.cancelled = True
