"""Decoding steps through one compiled graph: gpt-fast's recipe (a static-shape KV cache and a
compiled step) applied to gpt2lab's caches, variants and int8 weights.

An eager decoding step runs about 25 small operators per layer, and on a CPU their dispatch costs
a large share of an int8 step (docs/benchmarks.md). ``torch.compile`` fuses them, but only pays
when every step runs the same graph, and the eager cache returns slices that grow by one token per
step: a new shape each time. So the decoder calls the model's explicit static path,
:meth:`GPT.decode_step`, with the next sequence index in a tensor that it owns: each layer writes its cache
there and attention reads all the slots through a mask (:meth:`KVCache.write_at`), so the shapes never
change and one graph serves every step. The decoder advances the index and the caches' lengths. The
price: attention reads the cache's whole capacity from the first step on. The prompt is still processed
eagerly.

Whether compiled steps are faster depends on the products: Inductor picks its own kernels, and on a
CPU those can lose to eager ones, so the first step of each shape times both ways and keeps the faster
(:class:`CompiledDecoder`).

Opt-in (``generate(..., compile=True)``, ``gpt2lab generate --compile``): the first compilation takes
seconds (tens of seconds without Inductor's cache), which only long generations win back. Each new
shape compiles again: batch size, dtype, padded or not, and the cache capacity, which generation
rounds up to a multiple of ``CAPACITY_STEP`` so that nearby prompt lengths share a graph. PyTorch
keeps 8 graphs per function (``torch._dynamo.config.recompile_limit``); past that, steps run
uncompiled, still correct. Where compilation fails (no C++ compiler for Inductor, ...), one warning
says so and the steps run eagerly.
"""

from __future__ import annotations

import functools
import warnings

import torch

from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels.choice import candidates, choose

# Cache slots are allocated in steps of this many tokens: at most 63 unused slots (a few MB more to read per step
# for GPT-2 124M, against its 124M int8 weights) buy fewer recompilations.
CAPACITY_STEP = 64


def cache_capacity(tokens: int) -> int:
    """Cache slots for ``tokens`` in all, rounded up to a multiple of ``CAPACITY_STEP``."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


# The two ways to run a decoding step, chosen per shape by measurement (or pinned by GPT2LAB_KERNEL).
MODES = tuple(
    candidates(
        {
            "compiled": ("compiled", "decoding steps through one compiled graph (generate --compile)"),
            "eager": ("eager", "decoding steps run operator by operator (what generate does without --compile)"),
        }
    )
)


def _eager_step(model, tokens: torch.Tensor, cache: list, position_ids: torch.Tensor | None) -> torch.Tensor:
    """The model's own incremental call, which advances the caches' lengths itself."""
    return model(tokens, cache=cache, position_ids=position_ids, last_only=True)


def _static_step(model, tokens: torch.Tensor, index: torch.Tensor, cache: list, position_ids: torch.Tensor | None):
    return model.decode_step(tokens, index, cache, position_ids)


@functools.cache
def _compiled_step():
    """One compiled function for every decoder (built on first use: importing the compiler takes time).
    Dynamo guards on shapes and dtypes, not on which model or cache is passed, so a second generation
    of the same shapes reuses the graph."""
    return torch.compile(_static_step, dynamic=False, fullgraph=True)


class CompiledDecoder:
    """``decoder(tokens (B, 1), position_ids)`` -> logits (B, 1, vocab) of the next step, like
    ``model(tokens, cache=cache, position_ids=position_ids, last_only=True)``.

    Created after the prompt has filled ``cache``; from then on the decoder owns the cache: it holds the
    next sequence index (a tensor) and advances it and the caches' lengths after each step. Unless
    ``mode`` fixes it, on a CPU the first step times the compiled step against the eager one and keeps
    the faster (:mod:`gpt2lab.kernels.choice`, operation "decode step"; ``GPT2LAB_KERNEL=compiled`` or
    ``eager`` pins it): compiled steps lose where Inductor's products are slower than eager ones and win
    where the products are cheap (int8). Other devices always compile.
    """

    def __init__(self, model, cache: list, mode: str | None = None) -> None:
        if not cache:
            raise GPT2LabError("compiled decoding needs the KV cache (use_cache=True)")
        if mode not in (None, *MODES):
            raise GPT2LabError(f"decoding mode must be 'compiled' or 'eager' (or None: measured), got {mode!r}")
        self.model, self.cache = model, cache
        self.index = torch.tensor([cache[0].length], device=cache[0].k.device)  # the next token's sequence index
        self.limit = min((c.capacity for c in cache if c.window is None), default=None)  # rings never fill
        self.mode = mode  # "compiled" or "eager"; None: chosen on the first step

    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[1] != 1:
            raise GPT2LabError(f"compiled decoding takes one token per row, got {tokens.shape[1]}")
        if self.limit is not None and self.cache[0].length >= self.limit:
            raise RuntimeError(f"KV cache is full ({self.limit} tokens)")
        if self.mode is None:
            self.mode = self._choose(tokens, position_ids)
        if self.mode == "compiled":
            try:
                logits = _compiled_step()(self.model, tokens, self.index, self.cache, position_ids)
            except _compile_failure() as error:  # nothing ran: this step, and all after it, run eagerly
                self.mode = _unavailable(error)
        if self.mode == "eager":
            logits = _eager_step(self.model, tokens, self.cache, position_ids)  # advances the lengths itself
        else:
            for layer in self.cache:
                layer.length += 1
        self.index.fill_(self.cache[0].length)
        return logits

    def _choose(self, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> str:
        """The mode for this model and shape: measured once per process on a CPU, "compiled" elsewhere.
        The trials repeat this step: both modes write the same cache slot with the same values, and the
        eager trials' length advance is undone. The first compiled trial compiles; it is not counted."""
        if self.index.device.type != "cpu":
            return "compiled"

        def compiled() -> None:
            _compiled_step()(self.model, tokens, self.index, self.cache, position_ids)

        def eager() -> None:
            _eager_step(self.model, tokens, self.cache, position_ids)
            for layer in self.cache:
                layer.length -= 1

        config = self.model.config
        dtype = self.model.quantized or str(self.model.transformer.wte.weight.dtype).removeprefix("torch.")
        B, slots, padded = tokens.shape[0], max(c.capacity for c in self.cache), position_ids is not None
        key = ("decode step", B, slots, padded, dtype, config.n_layer, config.n_embd, config.vocab_size)
        shape = f"B={B}{' padded' if padded else ''}, {slots} slots, {config.n_layer}x{config.n_embd}, {dtype}"
        try:
            return choose(key, "decode step", shape, {"compiled": compiled, "eager": eager}, fallback="eager")
        except _compile_failure() as error:  # no choice is recorded: the next decoder tries again
            return _unavailable(error)


def _compile_failure() -> type[Exception]:
    """The exception torch.compile raises when its backend cannot compile (no C++ compiler, ...).

    Imported when an ``except`` clause asks for it, that is after torch.compile has run and loaded its
    compiler stack: importing ``torch._dynamo`` at the top of this module cost every gpt2lab process
    (``import gpt2lab`` imports the kernels) about 70 MiB of resident memory, compiling or not."""
    from torch._dynamo.exc import BackendCompilerFailed

    return BackendCompilerFailed


def _unavailable(error: Exception) -> str:
    """Warn once that compilation failed (no C++ compiler for Inductor, ...); the mode to use instead."""
    inner = error.inner_exception
    reason = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    warnings.warn(f"compiled decoding unavailable ({reason}): decoding eagerly", stacklevel=4)
    return "eager"
