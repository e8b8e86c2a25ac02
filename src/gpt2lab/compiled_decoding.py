"""Decoding steps through one compiled graph: gpt-fast's recipe (a static-shape KV cache and a
compiled step) applied to gpt2lab's caches, variants and int8 weights.

An eager decoding step runs about 25 small operators per layer, and on a CPU their dispatch costs
as much as a third of an int8 step (docs/benchmarks.md). ``torch.compile`` fuses them, but only pays
when every step runs the same graph, and the eager cache returns slices that grow by one token per
step: a new shape each time. Here each layer's cache is written at a sequence index held in a tensor
and attention reads all its slots through a mask (:meth:`KVCache.write_at`), so the shapes never
change and one graph serves every step. The price: attention reads the cache's whole capacity from
the first step on. The prompt is still processed eagerly.

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
from torch._dynamo.exc import BackendCompilerFailed

from .config import GPT2LabError
from .kv_cache import KVCache

# Cache slots are allocated in steps of this many tokens: at most 63 unused slots (for GPT-2 124M, ~4.6 MB
# more to read per step, against 124 MB of int8 weights) buy fewer recompilations.
CAPACITY_STEP = 64


def cache_capacity(tokens: int) -> int:
    """Cache slots for ``tokens`` in all, rounded up to a multiple of ``CAPACITY_STEP``."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def _decode_step(model, tokens: torch.Tensor, cache: list[KVCache], position_ids: torch.Tensor | None):
    return model(tokens, cache=cache, position_ids=position_ids, last_only=True)


@functools.cache
def _compiled_step():
    """One compiled function for every decoder (built on first use: importing the compiler takes time).
    Dynamo guards on shapes and dtypes, not on which model or cache is passed, so a second generation
    of the same shapes reuses the graph."""
    return torch.compile(_decode_step, dynamic=False, fullgraph=True)


class CompiledDecoder:
    """``decoder(tokens (B, 1), position_ids)`` -> logits (B, 1, vocab) of the next step, like
    ``model(tokens, cache=cache, position_ids=position_ids, last_only=True)``, through the compiled graph.

    From construction on, ``cache`` is written at the index its ``step_index`` tensor holds; this object
    advances that index and the caches' host-side lengths after each step.
    """

    def __init__(self, model, cache: list[KVCache]) -> None:
        if not cache:
            raise GPT2LabError("compiled decoding needs the KV cache (use_cache=True)")
        self.model, self.cache = model, cache
        self.index = torch.tensor([cache[0].length], device=cache[0].k.device)
        for layer in cache:
            layer.step_index = self.index  # one tensor shared by all layers: advanced once per step
        self.limit = min((c.capacity for c in cache if c.window is None), default=None)  # rings never fill
        self.compiled = True  # False once compilation failed: the same static-shape step, run eagerly

    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[1] != 1:
            raise GPT2LabError(f"compiled decoding takes one token per row, got {tokens.shape[1]}")
        if self.limit is not None and self.cache[0].length >= self.limit:
            raise RuntimeError(f"KV cache is full ({self.limit} tokens)")
        logits = self._step(tokens, position_ids)
        self.index += 1
        for layer in self.cache:
            layer.length += 1
        return logits

    def _step(self, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        if self.compiled:
            try:
                return _compiled_step()(self.model, tokens, self.cache, position_ids)
            except BackendCompilerFailed as error:  # no C++ compiler, ...: nothing ran, so the step can run eagerly
                inner = error.inner_exception
                reason = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
                warnings.warn(f"compiled decoding unavailable ({reason}): decoding eagerly", stacklevel=3)
                self.compiled = False
        return _decode_step(self.model, tokens, self.cache, position_ids)
