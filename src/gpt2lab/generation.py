"""Sampling with a KV cache: prefill the prompt once, then one token per step.

Ragged batches are left-padded; the attention mask hides the padding and position ids count real
tokens only, so each row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .config import GPT2LabError

EOT = 50256  # <|endoftext|>: GPT-2's only special token, also used as padding


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise GPT2LabError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GPT2LabError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GPT2LabError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and attention mask (B, T) for prompts of different lengths.

    The pad id is arbitrary (the mask hides it); 0 exists in every vocabulary.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GPT2LabError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return idx, mask


class _StopChecker:
    """Tracks, per row, whether a stop token was produced or a stop string appeared in the decoded text."""

    def __init__(self, stop, batch: int, tokenizer=None) -> None:
        stop = [stop] if isinstance(stop, (str, int)) else list(stop or [])
        self.tokens = {s for s in stop if isinstance(s, int)}
        self.strings = [s for s in stop if isinstance(s, str)]
        if self.strings and tokenizer is None:
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.tokenizer = tokenizer
        self.generated: list[list[int]] = [[] for _ in range(batch)]

    def update(self, tokens: list[int], done: list[bool]) -> None:
        for row, tok in enumerate(tokens):
            if done[row]:
                continue
            self.generated[row].append(tok)
            if tok in self.tokens:
                done[row] = True
            elif self.strings:
                # Only the tail can hold a newly completed stop string.
                tail = self.tokenizer.decode(self.generated[row][-64:])
                done[row] = any(s in tail for s in self.strings)


def stream_generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop=None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    tokenizer=None,
) -> Iterator[tuple[torch.Tensor, list[bool]]]:
    """Yield ``(next_tokens (B,), finished)`` after every step; a row stays finished once it stops."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise GPT2LabError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = idx.shape
    config = model.config
    config.check_length(T + max_new_tokens)
    device = model.device
    idx = idx.to(device)
    mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stopper = _StopChecker(stop, B, tokenizer)
    done = [False] * B
    fill_id = EOT if EOT < config.vocab_size else 0  # what finished rows keep producing

    def positions(m: torch.Tensor) -> torch.Tensor:
        return (m.cumsum(dim=1) - 1).clamp(min=0)  # real tokens count from 0 in every row

    model_was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
        pos = None if mask is None else positions(mask)
        logits = model(idx, cache=cache, attention_mask=mask, position_ids=pos, last_only=True)
        seq, seq_mask = idx, mask
        for _ in range(max_new_tokens):
            next_tok = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            next_tok = torch.where(torch.tensor(done, device=device), fill_id, next_tok)
            stopper.update(next_tok.tolist(), done)
            yield next_tok, list(done)
            if all(done):
                return
            step = next_tok[:, None]
            if seq_mask is not None:
                seq_mask = torch.cat((seq_mask, torch.ones_like(step)), dim=1)
            if use_cache:
                pos = None if seq_mask is None else positions(seq_mask)[:, -1:]
                logits = model(step, cache=cache, position_ids=pos, last_only=True)
            else:
                seq = torch.cat((seq, step), dim=1)
                pos = None if seq_mask is None else positions(seq_mask)
                logits = model(seq, attention_mask=seq_mask, position_ids=pos, last_only=True)
    finally:
        model.train(model_was_training)


def generate(
    model,
    idx,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop=None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    tokenizer=None,
):
    """Generate up to ``max_new_tokens`` after each prompt.

    ``idx`` is a (B, T) tensor (returns a (B, T + n) tensor; rows that stopped early are filled with
    ``<|endoftext|>``, or 0 in vocabularies too small to hold it) or a list of token-id lists of any
    lengths (returns a list of lists: each prompt followed by its own continuation, which ends with the
    stop token or the text with the stop string).
    ``stop`` holds token ids and/or strings. ``temperature=0`` is greedy; ``seed`` makes sampling
    reproducible.
    """
    ragged = not isinstance(idx, torch.Tensor)
    if ragged:
        prompts = [list(p) for p in ([idx] if idx and isinstance(idx[0], int) else idx)]
        idx, attention_mask = left_pad(prompts)
    elif idx.dim() != 2:
        raise GPT2LabError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
    steps = []
    finished_at = [None] * idx.shape[0]
    for i, (tok, done) in enumerate(
        stream_generate(
            model,
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=stop,
            seed=seed,
            attention_mask=attention_mask,
            use_cache=use_cache,
            tokenizer=tokenizer,
        )
    ):
        steps.append(tok)
        for row, d in enumerate(done):
            if d and finished_at[row] is None:
                finished_at[row] = i + 1
    new = torch.stack(steps, dim=1) if steps else idx.new_zeros((idx.shape[0], 0))
    if not ragged:
        return torch.cat((idx.to(new.device), new), dim=1)
    return [p + new[row, : finished_at[row] or new.shape[1]].tolist() for row, p in enumerate(prompts)]


def _complete_utf8(raw: bytes) -> str:
    """Decode, leaving out a UTF-8 sequence cut at the end (the next token may complete it)."""
    for cut in range(4):
        try:
            return raw[: len(raw) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace")


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, *, stop=None, **sampling) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece, ending before the first stop string.

    Text is released only once it is complete UTF-8 and cannot be the start of a stop string, so
    a stop string is never half printed.
    """
    ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})
    if not ids:
        raise GPT2LabError("the prompt is empty")
    model.config.check_length(len(ids) + max_new_tokens)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    text_stops = [s for s in stops if isinstance(s, str)]
    generated: list[int] = []
    emitted = 0  # characters of the decoded continuation already yielded
    stream = stream_generate(
        model, torch.tensor([ids]), max_new_tokens, stop=[*stops, EOT], tokenizer=tokenizer, **sampling
    )
    for tok, done in stream:
        if tok.item() != EOT:
            generated.append(tok.item())
        text = _complete_utf8(tokenizer.decode_bytes(generated))
        cut = min((text.find(s) for s in text_stops if s in text), default=-1)
        if cut >= 0:
            yield text[emitted:cut]
            return
        safe = len(text)
        for s in text_stops:  # hold back a tail that could grow into a stop string
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    safe = min(safe, len(text) - n)
                    break
        if not done[0] and safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if done[0]:
            yield text[emitted:]
            return
