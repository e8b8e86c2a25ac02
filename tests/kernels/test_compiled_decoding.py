"""Compiled decoding (static-shape cache, one graph for every step, on CUDA one CUDA graph) against eager
decoding with the cache."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from gpt2lab import GPT, GPT2LabError, GPTConfig, generation, quantize
from gpt2lab.attention import masked_attention, one_query_attention
from gpt2lab.generation import StopConditions
from gpt2lab.kernels import choice as kernel_choice
from gpt2lab.kernels import compiled_decoding
from gpt2lab.kernels.compiled_decoding import CompiledDecoder, GraphRecordingFailed
from gpt2lab.kernels.quantize import _LAYERS

# A fallback to eager steps (or to steps without CUDA graphs) would make every comparison below pass without
# compiling (or recording) anything.
pytestmark = [
    pytest.mark.filterwarnings("error:compiled decoding unavailable"),
    pytest.mark.filterwarnings("error:CUDA graph recording failed"),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

# Two configurations that between them take every branch of the static path: learned positions with
# full attention (a linear buffer), and RoPE + GQA + a window shorter than the prompt (a ring).
VARIANTS = {
    "learned-mha-full": dict(pos_encoding="learned", n_kv_head=4, window=None),
    "rope-gqa-window": dict(pos_encoding="rope", n_kv_head=2, window=5),
}


@pytest.fixture(autouse=True)
def fresh_compiler(monkeypatch):
    """Each test starts with no compiled graphs (none meets PyTorch's limit of graphs per function) and no
    measured choices; the compiled step is pinned, so that the comparisons test it whichever is faster."""
    torch._dynamo.reset()
    kernel_choice.forget()
    monkeypatch.setenv(kernel_choice.ENV, "compiled")


def tiny_model(**variant) -> GPT:
    torch.manual_seed(4)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=97, **variant)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_greedy_decoding_equals_eager(variant):
    model = tiny_model(**VARIANTS[variant])
    prompt = torch.randint(0, 97, (2, 12))
    eager = model.generate(prompt, 30, temperature=0)
    assert torch.equal(model.generate(prompt, 30, temperature=0, compile=True), eager)
    # A second call whose cache rounds to the same capacity reuses the graph: a recompilation would raise.
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(model.generate(prompt, 25, temperature=0, compile=True), eager[:, :37])
    # Ragged prompts: left padding, per-row positions and the cache's validity mask.
    prompts = [prompt[0, :3].tolist(), prompt[1].tolist()]
    assert model.generate(prompts, 20, temperature=0, compile=True) == model.generate(prompts, 20, temperature=0)


def test_compiled_int8_decoding_is_one_graph_with_the_eager_tokens():
    """fullgraph=True turns any graph break into an error: FBGEMM's int8 product must stay inside the graph."""
    model = quantize(tiny_model(**VARIANTS["learned-mha-full"]), "int8")
    prompt = torch.randint(0, 97, (1, 7))
    compiled = model.generate(prompt, 16, temperature=0, compile=True)
    assert torch.equal(compiled, model.generate(prompt, 16, temperature=0))


def test_compiled_decoding_logits_match_eager_steps():
    model = tiny_model(**VARIANTS["rope-gqa-window"])
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        eager_cache, static_cache = model.new_cache(1, 20), model.new_cache(1, 20)
        model(idx, cache=eager_cache)
        model(idx, cache=static_cache)
        decoder = CompiledDecoder(model, static_cache)
        for token in (3, 50, 7, 96, 0, 11):  # past the window of 5: the ring wraps
            step = torch.tensor([[token]])
            torch.testing.assert_close(decoder(step), model(step, cache=eager_cache), atol=1e-5, rtol=0)
    assert static_cache[0].length == eager_cache[0].length == 15


def test_compiled_decoding_refuses_what_it_cannot_do():
    model = tiny_model(**VARIANTS["learned-mha-full"])
    with pytest.raises(GPT2LabError, match="needs the KV cache"):
        model.generate(torch.tensor([[1, 2]]), 3, compile=True, use_cache=False)
    with torch.no_grad():
        cache = model.new_cache(1, 3)
        model(torch.tensor([[1, 2]]), cache=cache)
        with pytest.raises(GPT2LabError, match="decoding mode must be one of compiled, cudagraphs, eager"):
            CompiledDecoder(model, cache, mode="fast")
        with pytest.raises(GPT2LabError, match="'cudagraphs' needs a CUDA device; the cache is on cpu"):
            CompiledDecoder(model, cache, mode="cudagraphs")
        decoder = CompiledDecoder(model, cache)
        with pytest.raises(GPT2LabError, match="one token per row"):
            decoder(torch.tensor([[1, 2]]))
        decoder(torch.tensor([[5]]))
        with pytest.raises(RuntimeError, match="KV cache is full"):
            decoder(torch.tensor([[6]]))


def test_a_copied_int8_layer_is_found_as_itself():
    """Under compilation an int8 layer is found by id: a copy must not call its original's weights."""
    model = quantize(tiny_model(**VARIANTS["learned-mha-full"]), "int8")
    twin = copy.deepcopy(model)
    layer, copied = model.lm_head, twin.lm_head
    assert copied.layer_id != layer.layer_id
    assert _LAYERS[layer.layer_id] is layer and _LAYERS[copied.layer_id] is copied


@pytest.mark.parametrize("n_kv_head,window,padded", [(4, None, False), (2, 3, True), (1, None, True)])
def test_one_query_attention_equals_the_masked_sdpa_path(n_kv_head, window, padded):
    """Compiled decoding's attention (sums Inductor can fuse) against the dense-mask SDPA path, run eagerly."""
    torch.manual_seed(1)
    B, S, hs = 2, 9, 8
    q, k, v = torch.randn(B, 4, 1, hs), torch.randn(B, n_kv_head, S, hs), torch.randn(B, n_kv_head, S, hs)
    key_index = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1, -1])  # two empty slots
    key_valid = torch.ones(B, S, dtype=torch.bool)
    if padded:
        key_valid[1, :2] = False
    query_index = torch.tensor([6])
    args = (key_index, key_valid if padded else None, window)
    torch.testing.assert_close(
        one_query_attention(q, k, v, query_index, *args), masked_attention(q, k, v, query_index, *args)
    )


@pytest.mark.filterwarnings("default:compiled decoding unavailable")
@pytest.mark.parametrize("pin", ["compiled", ""], ids=["pinned", "measured"])
def test_decoding_falls_back_to_eager_when_compilation_fails(monkeypatch, pin):
    """No C++ compiler (or any backend failure): one warning, then the same tokens, decoded eagerly."""
    monkeypatch.setenv(kernel_choice.ENV, pin)

    def failing_backend(*args):
        raise BackendCompilerFailed("inductor", RuntimeError("no working C++ compiler found"), None)

    monkeypatch.setattr(compiled_decoding, "_compiled_step", lambda: failing_backend)
    model = tiny_model(**VARIANTS["rope-gqa-window"])
    prompt = torch.randint(0, 97, (1, 8))
    with pytest.warns(UserWarning, match=r"compiled decoding unavailable \(no working C\+\+ compiler found\)"):
        fallback = model.generate(prompt, 12, temperature=0, compile=True)
    assert torch.equal(fallback, model.generate(prompt, 12, temperature=0))
    assert not any(d.how == "measured" for d in kernel_choice.decisions() if d.operation == "decode step")


def test_the_faster_of_compiled_and_eager_steps_is_measured_and_kept(monkeypatch):
    monkeypatch.delenv(kernel_choice.ENV)
    model = tiny_model(**VARIANTS["rope-gqa-window"])
    prompt = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        cache = model.new_cache(1, 64)
        model(prompt, cache=cache)
        decoder = CompiledDecoder(model, cache)
        tokens = [decoder(torch.tensor([[t]])).argmax(-1) for t in (5, 9, 13)]
    (decision,) = [d for d in kernel_choice.decisions() if d.operation == "decode step"]
    assert decision.how == "measured" and set(decision.times) == {"compiled", "eager"}
    assert decision.picked == min(decision.times, key=decision.times.get) == decoder.mode
    assert decision.shape == "B=1, 5 slots, 2x32, float32"  # a ring of W = 5 per layer
    # The trials repeated the first step without moving the cache on: the tokens are eager decoding's.
    with torch.no_grad():
        cache = model.new_cache(1, 64)
        model(prompt, cache=cache)
        assert tokens == [model(torch.tensor([[t]]), cache=cache, last_only=True).argmax(-1) for t in (5, 9, 13)]
    assert cache[0].length == decoder.cache[0].length == 11


def test_an_eager_pin_never_compiles(monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV, "eager")
    monkeypatch.setattr(compiled_decoding, "_compiled_step", None)  # any compilation attempt would fail loudly
    model = tiny_model(**VARIANTS["learned-mha-full"])
    prompt = torch.randint(0, 97, (2, 6))
    assert torch.equal(
        model.generate(prompt, 10, temperature=0, compile=True), model.generate(prompt, 10, temperature=0)
    )


# ---------------------------------------------------------------------------------------- recorded steps (CUDA graphs)


def rerun_recorder(calls: list):
    """A CPU stand-in for :func:`compiled_decoding.record_cuda_graph` with a CUDA graph's contract: each replay
    reads the buffers the step was recorded with and overwrites the one output tensor. A decoder that passed
    new tensors instead of copying into those buffers, or returned the output without copying it, would
    decode wrong tokens or see its earlier logits change."""

    def record(run):
        calls.append(run)
        output = run()
        return (lambda: output.copy_(run())), output

    return record


@pytest.fixture
def recorded_on_cpu(monkeypatch):
    """generate(compile=True) decodes through RecordedStep on the CPU: the stand-in recorder, and the static step
    uncompiled (compilation is tested above; this is what surrounds the replay)."""
    calls: list = []
    monkeypatch.setitem(compiled_decoding.RECORDERS, "cpu", rerun_recorder(calls))
    monkeypatch.setattr(compiled_decoding, "_compiled_step", lambda: compiled_decoding._static_step)
    monkeypatch.setattr(generation, "CompiledDecoder", functools.partial(CompiledDecoder, mode="cudagraphs"))
    return calls


def test_recorded_steps_decode_the_eager_tokens(recorded_on_cpu):
    model = tiny_model(**VARIANTS["rope-gqa-window"])  # a ring that wraps, GQA, RoPE
    prompts = [[5, 9, 13], list(range(20, 31))]  # ragged: left padding and per-row position ids
    assert model.generate(prompts, 16, temperature=0, compile=True) == model.generate(prompts, 16, temperature=0)
    assert len(recorded_on_cpu) == 1  # recorded once, on the first step, then replayed
    # Sampled (seeded): greedy tokens of a tiny random model soon repeat one token, which stale inputs would too.
    prompt = torch.randint(0, 97, (3, 6))
    eager = model.generate(prompt, 12, temperature=1.0, seed=7)
    assert len(set(eager[:, 6:].flatten().tolist())) > 3
    assert torch.equal(model.generate(prompt, 12, temperature=1.0, seed=7, compile=True), eager)
    assert len(recorded_on_cpu) == 2  # a new generation, a new cache: recorded again


def test_recorded_step_logits_stay_the_same_after_later_replays(recorded_on_cpu):
    model = tiny_model(**VARIANTS["learned-mha-full"])
    idx = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        eager_cache, static_cache = model.new_cache(2, 16), model.new_cache(2, 16)
        model(idx, cache=eager_cache)
        model(idx, cache=static_cache)
        decoder = CompiledDecoder(model, static_cache, mode="cudagraphs")
        steps = [torch.tensor([[t], [t + 1]]) for t in (3, 50, 7, 90)]
        recorded = [decoder(step) for step in steps]  # compared only after every replay has run
        expected = [model(step, cache=eager_cache) for step in steps]
        for got, want in zip(recorded, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        with pytest.raises(GPT2LabError, match=r"takes the batch it was recorded with \(\(2, 1\) tokens"):
            decoder(torch.tensor([[1]]))
    assert static_cache[0].length == eager_cache[0].length == 9
    assert decoder.index.item() == 9


@pytest.mark.filterwarnings("default:CUDA graph recording failed")
def test_a_failed_recording_decodes_through_the_compiled_step(monkeypatch, recorded_on_cpu):
    def refuse(run):
        run()  # the warm-up ran (and wrote this step's cache slot) before the capture failed
        raise GraphRecordingFailed("operation not permitted when stream is capturing")

    monkeypatch.setitem(compiled_decoding.RECORDERS, "cpu", refuse)
    model = tiny_model(**VARIANTS["rope-gqa-window"])
    prompt = torch.randint(0, 97, (2, 7))
    with pytest.warns(UserWarning, match=r"CUDA graph recording failed \(operation not permitted"):
        recovered = model.generate(prompt, 10, temperature=0, compile=True)
    assert torch.equal(recovered, model.generate(prompt, 10, temperature=0))


def test_without_stop_conditions_no_step_reads_its_tokens_on_the_host(monkeypatch):
    """tokens.tolist() waits for the device: the loop does it only where stop tokens or strings need it."""
    model = tiny_model(**VARIANTS["learned-mha-full"])
    prompt = torch.randint(0, 97, (2, 4))
    read = []
    original = StopConditions.update
    monkeypatch.setattr(StopConditions, "update", lambda self, tokens: (read.append(tokens), original(self, tokens)))
    free = model.generate(prompt, 6, temperature=0)
    assert read == []
    stopped = model.generate(prompt, 6, temperature=0, stop=[int(free[0, 4])])  # row 0 stops at its first token
    assert len(read) >= 1 and torch.equal(stopped[:, :5], free[:, :5])


def _cuda_variants():
    return [pytest.param(name, batch, id=f"{name}-B{batch}") for name in VARIANTS for batch in (1, 4)]


@pytest.fixture
def exact_fp32():
    """fp32 products without TF32 (a training test may have switched it on): the tokens compared are then decided
    by sums in a different order only. Set through the legacy flag, which sets the new API's state too; restored
    through whichever API the state came from (reading the legacy flag raises after the new API alone set it)."""
    matmul = torch.backends.cuda.matmul
    new = matmul.fp32_precision
    try:
        legacy = matmul.allow_tf32
    except RuntimeError:
        legacy = None
    matmul.allow_tf32 = False
    yield
    if legacy is None:
        matmul.fp32_precision = new
    else:
        matmul.allow_tf32 = legacy


@needs_cuda
@pytest.mark.parametrize("variant,batch", _cuda_variants())
def test_cuda_graph_greedy_decoding_equals_eager(monkeypatch, exact_fp32, variant, batch):
    """On CUDA generate(compile=True) records the compiled step as a CUDA graph (the default there) and decodes
    eager decoding's tokens: B=1 and batched, learned and RoPE, MHA and GQA, full and windowed."""
    monkeypatch.delenv(kernel_choice.ENV)
    recorded = []

    def record(run):
        recorded.append(run)
        return compiled_decoding.record_cuda_graph(run)

    monkeypatch.setitem(compiled_decoding.RECORDERS, "cuda", record)
    model = tiny_model(**VARIANTS[variant]).cuda()
    prompt = torch.randint(0, 97, (batch, 9), device="cuda")
    eager = model.generate(prompt, 40, temperature=0)
    assert torch.equal(model.generate(prompt, 40, temperature=0, compile=True), eager)
    assert len(recorded) == 1
    prompts = [prompt[0, :3].tolist(), *prompt[1:].tolist()]  # ragged when batched: padding, position ids
    assert model.generate(prompts, 20, temperature=0, compile=True) == model.generate(prompts, 20, temperature=0)


@needs_cuda
def test_cuda_graph_steps_never_wait_for_the_device(exact_fp32):
    """After the first step (which compiles and records) a step is copies, one replay and a fill: no host sync."""
    model = tiny_model(**VARIANTS["rope-gqa-window"]).cuda()
    prompt = torch.randint(0, 97, (2, 8), device="cuda")
    with torch.no_grad():
        cache = model.new_cache(2, 64)
        logits = model(prompt, cache=cache, last_only=True)
        decoder = CompiledDecoder(model, cache, mode="cudagraphs")
        tokens = [logits[:, -1].argmax(-1)]
        logits = decoder(tokens[-1][:, None])
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(20):
                tokens.append(logits[:, -1].argmax(-1))
                logits = decoder(tokens[-1][:, None])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens.append(logits[:, -1].argmax(-1))
    eager = model.generate(prompt, 22, temperature=0)
    assert torch.equal(torch.stack(tokens, dim=1), eager[:, 8:])
