"""What generation costs and how far it reaches, checked before anything is allocated.

:func:`check_generation_memory` refuses a request whose KV cache and logits need more memory than the
device has free (the size in the message), where torch would try to allocate terabytes.
:func:`must_slide` and :func:`sliding_steps` let a model with learned positions generate past its
context, as nanoGPT's sampler does: each step reads the last ``block_size`` tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels.compiled_decoding import cache_capacity


def must_slide(config, prompt_length: int, max_new_tokens: int, padded: bool) -> bool:
    """Whether generation must slide the context: learned positions, a prompt that fits, an output that does
    not. A prompt longer than the context, or a padded batch, is refused by ``check_length`` instead."""
    if config.pos_encoding != "learned" or prompt_length + max_new_tokens <= config.block_size:
        return False
    config.check_length(prompt_length)  # a prompt beyond the context would be cut: refused, never cut silently
    if padded:
        config.check_length(prompt_length + max_new_tokens)
    return True


def plan_request(
    model, batch: int, prompt: int, new_tokens: int, slide: bool, padded: bool, compile: bool, use_cache: bool
) -> tuple[bool, int]:
    """(whether the context slides, the KV cache's capacity in tokens), after refusing a length a learned-position
    model cannot reach without sliding and a request that needs more memory than is free."""
    if slide and must_slide(model.config, prompt, new_tokens, padded):
        check_generation_memory(model, batch, 0, model.config.block_size)  # each step reads one context, no cache
        return True, 0
    model.config.check_length(prompt + new_tokens)
    capacity = cache_capacity(prompt + new_tokens) if compile else prompt + new_tokens
    check_generation_memory(model, batch, capacity if use_cache else 0, prompt + new_tokens)
    return False, capacity


def sliding_steps(model, idx, max_new_tokens: int, sampler, generator, stops, fill) -> Iterator[tuple]:
    """Generation past the context of a learned-position model, as nanoGPT's sampler does it: each step reads
    the last ``block_size`` tokens afresh (no cache), so each token sees as much context as the model was
    trained on. Said once on stderr: the output is not what an unbounded context would give."""
    block = model.config.block_size
    print(
        f"note: the model's context is {block} tokens (learned positions): generation slides it over the last "
        f"{block} tokens",
        file=sys.stderr,
    )
    for _ in range(max_new_tokens):  # the caller holds the model in eval mode, without gradients
        tokens = sampler(model(idx[:, -block:], last_only=True)[:, -1], generator)
        if any(stops.finished):
            tokens = torch.where(torch.tensor(stops.finished, device=idx.device), fill, tokens)
        stops.update(tokens.tolist())
        yield tokens, list(stops.finished)
        if all(stops.finished):
            return
        idx = torch.cat((idx, tokens[:, None]), dim=1)


def _free_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now (CUDA: free memory; CPU: Linux's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # unknown (not Linux): not checked


def generation_bytes(config, batch: int, cache_tokens: int, length: int, itemsize: int) -> int:
    """Bytes generation allocates: the KV cache (K and V per layer; a windowed layer keeps a ring of W slots)
    for ``cache_tokens`` tokens (0: no cache, then each step recomputes ``length`` tokens' logits)."""
    slots = sum(
        cache_tokens if config.layer_window(i) is None else min(config.layer_window(i), cache_tokens)
        for i in range(config.n_layer)
    )
    cache = 2 * batch * config.n_kv_head * config.head_dim * slots * itemsize
    logits = batch * (1 if cache_tokens else length) * config.vocab_size * 4  # float32 scores
    return cache + logits


def check_generation_memory(model, batch: int, cache_tokens: int, length: int) -> None:
    """Refuse, before allocating, a generation whose KV cache and logits need more memory than is free."""
    itemsize = model.transformer.wte.weight.element_size()
    need = generation_bytes(model.config, batch, cache_tokens, length, itemsize)
    free = _free_memory(model.device)
    if free is not None and need > free:
        raise GPT2LabError(
            f"generating {length:,} tokens (batch {batch}) needs {need / 2**30:,.1f} GiB for the KV cache and "
            f"logits, more than the {free / 2**30:,.1f} GiB free on {model.device}; ask for fewer tokens"
        )
