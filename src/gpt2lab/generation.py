"""Text generation in one straight line: check the request once, prefill the prompts, then per step
sample, check the stop conditions, and feed the new tokens back through the KV cache.

Ragged batches are left-padded: the attention mask hides the padding at prefill, the cache remembers
it, and position ids count real tokens only, so each row decodes exactly as it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from gpt2lab.config import GPT2_EOT_ID
from gpt2lab.errors import GPT2LabError, check_seed
from gpt2lab.generation_limits import plan_request, sliding_steps
from gpt2lab.kernels.compiled_decoding import CompiledDecoder
from gpt2lab.tokenizer import load_tokenizer

# Magnitudes at or below 2^-150 round to 0 in float32 (half the smallest subnormal, ties to even): the
# logits' dtype would divide by zero. Compared on the Python float, so no tensor is made per step.
FLOAT32_ROUNDS_TO_ZERO = 2.0**-150


@dataclass(frozen=True)
class Sampler:
    """How the next token is drawn from the last position's logits. ``temperature == 0`` is greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise GPT2LabError(f"temperature must be >= 0 (0 is greedy) and finite, got {t}")
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise GPT2LabError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise GPT2LabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            check_seed("seed", self.seed)

    def generator(self, device: torch.device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_next(logits, self.temperature, self.top_k, self.top_p, generator)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). ``temperature == 0`` is greedy."""
    if abs(temperature) <= FLOAT32_ROUNDS_TO_ZERO:  # 0, or a temperature float32 cannot hold: greedy
        return logits.argmax(dim=-1)
    # Shifted so the largest logit is 0 before scaling: a tiny temperature then gives -inf, not inf - inf.
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[:, 0] = False  # the most likely token always stays (a top_p below float32's range kept none)
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------- the request


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and the number of pad tokens in front of each row (B,).

    The pad id is arbitrary (the mask hides it); 0 exists in every vocabulary.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GPT2LabError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    return idx, torch.tensor([width - len(p) for p in prompts])


def _pad_counts(idx: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Leading pad tokens per row of a (B, T) batch with a left-padding mask; None when no row is padded."""
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise GPT2LabError(f"prompt ids must have shape (batch, time) with time >= 1, got {tuple(idx.shape)}")
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.long).cpu()
    pad = (mask.cumsum(dim=1) == 0).sum(dim=1)  # zeros before the first real token
    if mask.shape != idx.shape or int(mask.sum()) != int((idx.shape[1] - pad).sum()):
        raise GPT2LabError("attention_mask must match the ids and mark left padding (0s, then 1s) only")
    return pad if bool((pad > 0).any()) else None


def _positions(pad: torch.Tensor | None, start: int, length: int, device) -> torch.Tensor | None:
    """Position ids (B, length) of sequence indices start.. when rows are padded: real tokens count from 0."""
    if pad is None:
        return None
    return (torch.arange(start, start + length, device=device)[None, :] - pad.to(device)[:, None]).clamp(min=0)


def _on_device(pad: torch.Tensor | None, T: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (B, T) mask of real tokens and the pad counts (B,) on ``device``, copied there once: a copy from the
    host at every decoding step would wait for the device. (None, None) when no row is padded."""
    if pad is None:
        return None, None
    return (torch.arange(T)[None, :] >= pad[:, None]).to(device), pad.to(device)


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------- the loop


def stream_generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    stop=None,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    compile: bool = False,
    tokenizer=None,
    slide: bool = False,
    **sampling,
) -> Iterator[tuple[torch.Tensor, list[bool]]]:
    """Yield ``(next_tokens (B,), finished)`` after every step; a row stays finished once it stops.

    ``sampling`` holds :class:`Sampler`'s fields (temperature, top_k, top_p, seed). ``stop`` holds token
    ids and strings (strings are matched in the decoded text of ``tokenizer``, GPT-2's by default).
    ``compile`` runs the steps after the prompt through one compiled graph
    (:mod:`gpt2lab.kernels.compiled_decoding`); it needs the cache. ``slide``: a model with learned positions
    generates past its context by reading the last ``block_size`` tokens at each step (:func:`sliding_steps`).
    """
    sampler = Sampler(**sampling)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GPT2LabError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if compile and not use_cache:
        raise GPT2LabError("compile=True needs the KV cache: drop use_cache=False")
    pad = _pad_counts(idx, attention_mask)
    B, T = idx.shape
    sliding, capacity = plan_request(model, B, T, max_new_tokens, slide, pad is not None, compile, use_cache)
    stops = StopConditions(stop, B, tokenizer)
    device = model.device
    idx, generator = idx.to(device), sampler.generator(device)
    fill = torch.tensor(GPT2_EOT_ID if GPT2_EOT_ID < model.config.vocab_size else 0, device=device)
    mask, pad = _on_device(pad, T, device)
    if sliding:
        with _eval_mode(model):
            yield from sliding_steps(model, idx, max_new_tokens, sampler, generator, stops, fill)
        return
    with _eval_mode(model):
        cache = model.new_cache(B, capacity) if use_cache else None
        logits = model(
            idx, cache=cache, attention_mask=mask, position_ids=_positions(pad, 0, T, device), last_only=True
        )
        decode = CompiledDecoder(model, cache) if compile else partial(model, cache=cache, last_only=True)
        for step in range(max_new_tokens):
            tokens = sampler(logits[:, -1], generator)
            if any(stops.finished):  # rows that stopped repeat the fill token (no work while none has)
                tokens = torch.where(torch.tensor(stops.finished, device=device), fill, tokens)
            stops.observe(tokens)
            yield tokens, list(stops.finished)
            if all(stops.finished) or step == max_new_tokens - 1:
                return
            if use_cache:
                pos = _positions(pad, T + step, 1, device)
                logits = decode(tokens[:, None], position_ids=pos)
            else:
                idx = torch.cat((idx, tokens[:, None]), dim=1)
                mask = None if mask is None else torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
                pos = _positions(pad, 0, idx.shape[1], device)
                logits = model(idx, attention_mask=mask, position_ids=pos, last_only=True)


class StopConditions:
    """Which rows have finished: on a stop token, or once a stop string appears in a row's decoded text."""

    def __init__(self, stop, batch: int, tokenizer=None) -> None:
        stop = [stop] if isinstance(stop, str | int) else list(stop or [])
        self.tokens = {s for s in stop if isinstance(s, int)}
        strings = [s for s in stop if isinstance(s, str)]
        if strings and tokenizer is None:
            tokenizer = load_tokenizer()
        self.tokenizer = tokenizer
        self.texts = [StopStrings(strings) for _ in range(batch)] if strings else None
        self.finished = [False] * batch
        self.active = bool(self.tokens) or self.texts is not None  # anything to check in each step's tokens

    def observe(self, tokens: torch.Tensor) -> None:
        """:meth:`update` from the step's tokens (B,) where a stop condition needs them. Reading them on the host
        waits for the device to finish the step; without stop conditions nothing waits, and a GPU runs the
        steps back to back while the host queues the next ones (the caller reads the tokens when it wants)."""
        if self.active:
            self.update(tokens.tolist())

    def update(self, tokens: list[int]) -> None:
        for row, token in enumerate(tokens):
            if self.finished[row]:
                continue
            if token in self.tokens:
                self.finished[row] = True
            elif self.texts is not None:
                self.finished[row] = self.texts[row].feed(self.tokenizer.decode_bytes([token]))


def generate(model, idx, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None, **options):
    """Generate up to ``max_new_tokens`` after each prompt.

    ``idx`` is a (B, T) tensor (returns a (B, T + n) tensor; rows that stopped early are filled with
    ``<|endoftext|>``, or 0 in vocabularies too small to hold it) or a list of token-id lists of any
    lengths (returns a list of lists: each prompt followed by its own continuation, which ends with the
    stop token or the text with the stop string). ``options`` are :func:`stream_generate`'s: ``stop``
    (token ids and/or strings), ``temperature`` (0 is greedy), ``top_k``, ``top_p``, ``seed`` (makes
    sampling reproducible), ``use_cache``, ``compile``, ``tokenizer``.
    """
    ragged = not isinstance(idx, torch.Tensor)
    if ragged:
        prompts = [list(p) for p in ([idx] if idx and isinstance(idx[0], int) else idx)]
        idx, pad = left_pad(prompts)
        attention_mask = torch.arange(idx.shape[1])[None, :] >= pad[:, None]
    steps, finished_at = [], [None] * idx.shape[0]
    for i, (tokens, finished) in enumerate(
        stream_generate(model, idx, max_new_tokens, attention_mask=attention_mask, **options)
    ):
        steps.append(tokens)
        finished_at = [at if at is not None or not f else i + 1 for at, f in zip(finished_at, finished, strict=True)]
    new = torch.stack(steps, dim=1) if steps else idx.new_zeros((idx.shape[0], 0))
    if not ragged:
        return torch.cat((idx.to(new.device), new), dim=1)
    return [p + new[row, : finished_at[row] or new.shape[1]].tolist() for row, p in enumerate(prompts)]


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, *, stop=None, **sampling) -> Iterator[str]:
    """The continuation of ``prompt``, piece by piece (an iterator), ending before the first stop string.

    Text is released only once it is complete UTF-8 and cannot be the start of a stop string, so a
    stop string is never half printed. The end-of-text token ends the stream too. ``sampling`` holds
    :class:`Sampler`'s fields and :func:`stream_generate`'s ``compile``.
    """
    eot = getattr(tokenizer, "eot_token", None)
    ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) if eot is not None else tokenizer.encode(prompt)
    if not ids:
        raise GPT2LabError("the prompt is empty")
    stops = [stop] if isinstance(stop, str | int) else list(stop or [])
    text = StopStrings([s for s in stops if isinstance(s, str)])
    stop_tokens = [s for s in stops if isinstance(s, int)] + ([eot] if eot is not None else [])
    # A bad prompt or stop string fails here, at the call, before the caller prints anything.
    return _release_text(model, tokenizer, ids, text, max_new_tokens, stop_tokens, sampling)


def _release_text(model, tokenizer, ids, text, max_new_tokens, stop_tokens, sampling) -> Iterator[str]:
    """:func:`stream_text`'s generator: decode each new token into ``text`` and yield what is safe to show."""
    eot = getattr(tokenizer, "eot_token", None)
    released = 0  # bytes of the continuation already yielded
    steps = stream_generate(model, torch.tensor([ids]), max_new_tokens, stop=stop_tokens, slide=True, **sampling)
    for tokens, finished in steps:
        token, done = tokens.item(), finished[0]
        if token != eot:
            done = text.feed(tokenizer.decode_bytes([token])) or done
        end = text.found if text.found is not None else len(text.data) if done else text.safe_end()
        if end > released:
            yield text.data[released:end].decode("utf-8", errors="replace")
            released = end
        if done:
            return
    if len(text.data) > released:  # max_new_tokens reached: what was held back is final now
        yield text.data[released:].decode("utf-8", errors="replace")


class StopStrings:
    """A growing byte string (one row's decoded continuation) searched for stop strings as it grows.

    Each new piece can only complete an occurrence that ends inside it, so only the last
    ``len(longest stop) - 1`` old bytes are searched again. ``found`` is where the first occurrence starts.
    """

    def __init__(self, strings: list[str]) -> None:
        if any(s == "" for s in strings):
            raise GPT2LabError("a stop string must not be empty")
        self.stops = [s.encode("utf-8") for s in strings]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.data = bytearray()
        self.found: int | None = None

    def feed(self, piece: bytes) -> bool:
        """Append ``piece``; True once a stop string has appeared."""
        start = max(0, len(self.data) - self.longest + 1)
        self.data += piece
        if self.found is None:
            hits = [i for s in self.stops if (i := self.data.find(s, start)) >= 0]
            self.found = min(hits) if hits else None
        return self.found is not None

    def safe_end(self) -> int:
        """How many bytes can be shown: none that may begin a stop string, no incomplete UTF-8 character."""
        end = len(self.data)
        for stop in self.stops:  # hold back the longest tail that is the start of a stop string
            for n in range(min(len(stop) - 1, len(self.data)), 0, -1):
                if self.data.endswith(stop[:n]):
                    end = min(end, len(self.data) - n)
                    break
        return _utf8_boundary(self.data, end)


def _utf8_boundary(data: bytes, end: int) -> int:
    """``end``, moved back before a multi-byte UTF-8 character that ``data[:end]`` cuts short."""
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # the first byte of the last character: how long is that character?
            size = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return end if back >= size else end - back
    return end
