"""Decoding steps through one compiled graph, and on CUDA through one CUDA graph: gpt-fast's recipe
(a static-shape KV cache, a compiled step, its kernels replayed as one graph) applied to gpt2lab's
caches, variants and int8 weights.

An eager decoding step runs about 25 small operators per layer, and on a CPU their dispatch costs
a large share of an int8 step (docs/benchmarks.md). ``torch.compile`` fuses them, but only pays
when every step runs the same graph, and the eager cache returns slices that grow by one token per
step: a new shape each time. So the decoder calls the model's explicit static path,
:meth:`GPT.decode_step`, with the next sequence index in a tensor that it owns: each layer writes its cache
there and attention reads all the slots through a mask (:meth:`KVCache.write_at`), so the shapes never
change and one graph serves every step. The decoder advances the index and the caches' lengths. The
price: attention reads the cache's whole capacity from the first step on. The prompt is still processed
eagerly.

On a GPU a compiled step still launches its kernels one by one from Python, and for a small model at a
small batch the GPU finishes each kernel sooner than the host launches the next: the host sets the pace.
So on CUDA the decoder records the compiled step once as a CUDA graph and replays it, one launch per token
(:class:`RecordedStep`, mode "cudagraphs"). A replay reads and writes the addresses it was recorded with,
which the static path already keeps fixed: the cache's buffers never move, the index is the decoder's own
tensor, and each step's tokens (and position ids) are copied into buffers the graph reads. The graph is
recorded by hand (``torch.cuda.graph``) rather than through ``torch.compile(mode="reduce-overhead")``:
the step writes the cache in place, and Inductor's CUDA graphs skip a function that mutates its inputs
unless those are marked static, a mark that ties the compiled code to one cache's tensors. A replay
makes no host sync; neither does the generation loop around it unless something must read the new
tokens on the host (stop tokens or strings, streamed text): :func:`gpt2lab.generation.stream_generate`.

Whether compiled steps are faster than eager ones depends on the products: Inductor picks its own kernels,
and on a CPU those can lose to eager ones, so the first step of each shape times both ways and keeps the
faster (:class:`CompiledDecoder`). On CUDA the recorded graph is used without measuring: measuring would
compile twice, and replaying removes the launch overhead that eager and compiled steps both pay.

Opt-in (``generate(..., compile=True)``, ``gpt2lab generate --compile``): the first compilation takes
seconds (tens of seconds without Inductor's cache), which only long generations win back. Each new
shape compiles again: batch size, dtype, padded or not, and the cache capacity, which generation
rounds up to a multiple of ``CAPACITY_STEP`` so that nearby prompt lengths share a graph. PyTorch
keeps 8 graphs per function (``torch._dynamo.config.recompile_limit``); past that, steps run
uncompiled, still correct. Where compilation fails (no C++ compiler for Inductor, ...), one warning
says so and the steps run eagerly; where recording the CUDA graph fails, one warning says so and the
compiled steps run without it. ``GPT2LAB_KERNEL=eager``, ``compiled`` or ``cudagraphs`` pins the mode.
"""

from __future__ import annotations

import functools
import warnings

import torch

from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels.choice import candidates, choose, pinned

# Cache slots are allocated in steps of this many tokens: at most 63 unused slots (a few MB more to read per step
# for GPT-2 124M, against its 124M int8 weights) buy fewer recompilations.
CAPACITY_STEP = 64


def cache_capacity(tokens: int) -> int:
    """Cache slots for ``tokens`` in all, rounded up to a multiple of ``CAPACITY_STEP``."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


# The ways to run a decoding step: on a CPU chosen per shape by measurement, on CUDA the recorded graph (either
# pinned by GPT2LAB_KERNEL).
MODES = tuple(
    candidates(
        {
            "compiled": ("compiled", "decoding steps through one compiled graph (generate --compile)"),
            "cudagraphs": (
                "cudagraphs",
                "decoding steps through one compiled graph recorded as a CUDA graph and replayed (CUDA only; "
                "what generate --compile does there)",
            ),
            "eager": ("eager", "decoding steps run operator by operator (what generate does without --compile)"),
        }
    )
)
WARMUP_RUNS = 2  # runs before recording: the first compiles, the second settles lazily created handles


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


class GraphRecordingFailed(RuntimeError):
    """The step could not be recorded as a CUDA graph (an operation a capture refuses)."""


def record_cuda_graph(run):
    """``(replay, output)``: ``run()`` recorded as a CUDA graph, and the tensor it returned, which every
    ``replay()`` overwrites. ``run`` is called first on a side stream, as torch.cuda.graph's documentation
    asks: compilation, autotuning and cuBLAS handles happen there, since none of them may happen while the
    stream is being recorded. Each call repeats the same step, so the cache receives the same values again."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            output = run()
    except RuntimeError as error:
        raise GraphRecordingFailed((str(error).strip().splitlines() or [type(error).__name__])[0]) from error
    return graph.replay, output


# How each device type records a step for replay. Only CUDA has one; tests add a CPU stand-in that re-runs the step
# into the same output tensor, which exercises everything around the replay (buffers, copies, index, lengths).
RECORDERS = {"cuda": record_cuda_graph}


class RecordedStep:
    """The compiled static step recorded once and replayed: ``step(tokens (B, 1), position_ids)`` -> logits.

    A replay reads its inputs at the addresses it was recorded with, so the tokens and position ids are
    copied into buffers of its own; the cache's tensors and the decoder's index never move. The logits
    come back as a copy, because the next replay overwrites the recorded output.
    """

    def __init__(self, model, tokens: torch.Tensor, index: torch.Tensor, cache: list, position_ids=None) -> None:
        self.tokens = tokens.clone()  # (B, 1)
        self.position_ids = None if position_ids is None else position_ids.clone()  # (B, 1)
        run = functools.partial(_compiled_step(), model, self.tokens, index, cache, self.position_ids)
        with torch.no_grad():  # nothing to record for autograd; a replay computes no gradients
            self.replay, self.logits = RECORDERS[index.device.type](run)

    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape != self.tokens.shape or (position_ids is None) != (self.position_ids is None):
            raise GPT2LabError(
                f"a recorded decoding step takes the batch it was recorded with ({tuple(self.tokens.shape)} tokens, "
                f"{'with' if self.position_ids is not None else 'without'} position ids)"
            )
        self.tokens.copy_(tokens)
        if position_ids is not None:
            self.position_ids.copy_(position_ids)
        self.replay()
        return self.logits.clone()


class CompiledDecoder:
    """``decoder(tokens (B, 1), position_ids)`` -> logits (B, 1, vocab) of the next step, like
    ``model(tokens, cache=cache, position_ids=position_ids, last_only=True)``.

    Created after the prompt has filled ``cache``; from then on the decoder owns the cache: it holds the
    next sequence index (a tensor) and advances it and the caches' lengths after each step. Unless
    ``mode`` fixes it, on a CPU the first step times the compiled step against the eager one and keeps
    the faster (:mod:`gpt2lab.kernels.choice`, operation "decode step"; ``GPT2LAB_KERNEL=compiled`` or
    ``eager`` pins it): compiled steps lose where Inductor's products are slower than eager ones and win
    where the products are cheap (int8). On CUDA the compiled step is recorded as a CUDA graph on the first
    step and replayed from then on ("cudagraphs"); other devices compile.
    """

    def __init__(self, model, cache: list, mode: str | None = None) -> None:
        if not cache:
            raise GPT2LabError("compiled decoding needs the KV cache (use_cache=True)")
        if mode not in (None, *MODES):
            raise GPT2LabError(
                f"decoding mode must be one of {', '.join(MODES)} (or None: chosen for the device), got {mode!r}"
            )
        device = cache[0].k.device
        if mode == "cudagraphs" and device.type not in RECORDERS:
            raise GPT2LabError(f"decoding mode 'cudagraphs' needs a CUDA device; the cache is on {device.type}")
        self.model, self.cache = model, cache
        self.index = torch.tensor([cache[0].length], device=device)  # the next token's sequence index
        self.limit = min((c.capacity for c in cache if c.window is None), default=None)  # rings never fill
        self.mode = mode  # "compiled", "cudagraphs" or "eager"; None: chosen on the first step
        self.recorded: RecordedStep | None = None  # mode "cudagraphs": recorded on the first step

    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[1] != 1:
            raise GPT2LabError(f"compiled decoding takes one token per row, got {tokens.shape[1]}")
        if self.limit is not None and self.cache[0].length >= self.limit:
            raise RuntimeError(f"KV cache is full ({self.limit} tokens)")
        if self.mode is None:
            self.mode = self._choose(tokens, position_ids)
        logits = self._static(tokens, position_ids) if self.mode != "eager" else None
        if self.mode == "eager":  # chosen, or compilation failed before anything ran
            logits = _eager_step(self.model, tokens, self.cache, position_ids)  # advances the lengths itself
        else:
            for layer in self.cache:
                layer.length += 1
        self.index.fill_(self.cache[0].length)  # a launch, not a host read: replays and steps stay queued
        return logits

    def _static(self, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """This step through the static path (compiled, or its recorded graph); None, the mode set to "eager",
        where compilation fails."""
        try:
            if self.mode == "cudagraphs":
                try:
                    if self.recorded is None:
                        self.recorded = RecordedStep(self.model, tokens, self.index, self.cache, position_ids)
                    return self.recorded(tokens, position_ids)
                except GraphRecordingFailed as error:  # the warm-up runs wrote this step's slot: harmless to redo
                    warnings.warn(f"CUDA graph recording failed ({error}): decoding without CUDA graphs", stacklevel=3)
                    self.mode = "compiled"
            return _compiled_step()(self.model, tokens, self.index, self.cache, position_ids)
        except _compile_failure() as error:  # nothing ran: this step, and all after it, run eagerly
            self.mode = _unavailable(error)
            return None

    def _choose(self, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> str:
        """The mode for this model and shape: measured once per process on a CPU, the recorded graph on CUDA,
        "compiled" elsewhere (or what GPT2LAB_KERNEL pins).
        The trials repeat this step: both modes write the same cache slot with the same values, and the
        eager trials' length advance is undone. The first compiled trial compiles; it is not counted."""
        device = self.index.device.type
        if device != "cpu":
            pins = [name for name in pinned() if name in MODES and (name != "cudagraphs" or device in RECORDERS)]
            return pins[0] if pins else "cudagraphs" if device in RECORDERS else "compiled"

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
        trials = {"compiled": compiled, "eager": eager, "cudagraphs": None}  # no CUDA graphs on a CPU
        try:
            return choose(key, "decode step", shape, trials, fallback="eager")
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
