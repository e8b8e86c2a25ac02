"""Attention variants (RoPE, GQA/MQA, sliding window) against a naive reference written out plainly here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gpt2lab import GPT, GPT2LabError, GPTConfig
from gpt2lab.attention import CausalSelfAttention
from gpt2lab.sliding_window import sliding_window_attention

POS = ["learned", "rope"]
KV = {"mha": 4, "gqa": 2, "mqa": 1}
WINDOWS = {"full": None, "window": 5}


def naive_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotation of channel pairs (i, i + hs/2) as complex numbers: z · exp(i · p · theta^(-2i/hs))."""
    hs = x.shape[-1]
    half = hs // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hs)
    angle = positions.to(torch.float64)[:, None] * freqs[None, :]  # (T, hs/2)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def naive_attention(layer: CausalSelfAttention, x: torch.Tensor, window: int | None) -> torch.Tensor:
    """Explicit score matrix, explicit mask, softmax, one head at a time."""
    B, T, C = x.shape
    nh, nkv, hs = layer.n_head, layer.n_kv_head, layer.head_dim
    qkv = x @ layer.c_attn.weight.T + layer.c_attn.bias
    q = qkv[..., : nh * hs].reshape(B, T, nh, hs)
    k = qkv[..., nh * hs : (nh + nkv) * hs].reshape(B, T, nkv, hs)
    v = qkv[..., (nh + nkv) * hs :].reshape(B, T, nkv, hs)
    positions = torch.arange(T)
    if layer.rotary is not None:
        q = naive_rope(q.transpose(1, 2), positions, 10000.0).transpose(1, 2)
        k = naive_rope(k.transpose(1, 2), positions, 10000.0).transpose(1, 2)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            mask[i, j] = j <= i and (window is None or i - j < window)
    heads = []
    for h in range(nh):
        g = h // (nh // nkv)  # query head h reads key/value head g
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hs)  # (B, T, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(dim=-1) @ v[:, :, g])  # (B, T, hs)
    y = torch.cat(heads, dim=-1)
    return y @ layer.c_proj.weight.T + layer.c_proj.bias


def tiny_config(pos="learned", n_kv_head=4, window=None, **kw) -> GPTConfig:
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=97)
    return GPTConfig(**{**base, "pos_encoding": pos, "n_kv_head": n_kv_head, "window": window, **kw})


@pytest.mark.parametrize(
    "pos,kv,win", list(itertools.product(POS, KV, WINDOWS)) + [("rope", "gqa", "window_w1"), ("learned", "mha", "w8")]
)
def test_layer_matches_naive_reference_outputs_and_gradients(pos, kv, win):
    window = {"full": None, "window": 5, "window_w1": 1, "w8": 8}[win]
    torch.manual_seed(0)
    layer = CausalSelfAttention(tiny_config(pos, KV[kv], window), layer=0)
    # T = 23 is not a multiple of the window: the banded kernel pads its last chunk.
    x = torch.randn(2, 23, 32, requires_grad=True)
    positions = torch.arange(23)
    y = layer(x, positions)
    y_ref = naive_attention(layer, x, window)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)

    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], grad_out)
    grads_ref = torch.autograd.grad(y_ref, [x, *layer.parameters()], grad_out)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=0)


def test_window_covers_exactly_w_keys_itself_included():
    """With equal scores each query averages exactly the keys it sees: position i sees i-W+1 .. i."""
    T, W = 37, 6
    q = torch.zeros(1, 1, T, 4)
    k = torch.zeros(1, 1, T, 4)
    v = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1).expand(1, 1, T, 4)
    y = sliding_window_attention(q, k, v, W)[0, 0, :, 0]
    expected = torch.tensor([sum(range(max(0, i - W + 1), i + 1)) / min(i + 1, W) for i in range(T)])
    torch.testing.assert_close(y, expected)
    # The other convention (W keys *before* the query, W + 1 in all) gives other means from position W on.
    one_more = torch.tensor([sum(range(max(0, i - W), i + 1)) / min(i + 1, W + 1) for i in range(T)])
    assert (y[W:] - one_more[W:]).abs().min() > 0.4


def test_window_at_least_sequence_length_equals_full_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 4, 20, 8).unbind(0)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for W in (20, 64):
        torch.testing.assert_close(sliding_window_attention(q, k, v, W), full)
    model_full = GPT(tiny_config())
    model_win = GPT(tiny_config(window=64))
    model_win.load_state_dict(model_full.state_dict())
    idx = torch.randint(0, 97, (2, 40))
    torch.testing.assert_close(model_win(idx), model_full(idx))


def test_n_kv_head_equal_n_head_is_mha_exactly():
    torch.manual_seed(2)
    mha = GPT(tiny_config(n_kv_head=None))
    assert mha.config.n_kv_head == mha.config.n_head
    explicit = GPT(tiny_config(n_kv_head=4))
    explicit.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 97, (2, 30))
    assert torch.equal(explicit(idx), mha(idx))
    assert torch.equal(mha.convert_to_gqa(4)(idx), mha(idx))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    model = GPT(tiny_config("rope", n_kv_head=2)).eval()
    assert "wpe" not in model.transformer
    idx = torch.randint(0, 97, (2, 25))
    base = model(idx, position_ids=torch.arange(25))
    for shift in (1, 17, 1000):  # 1000 is far past block_size: RoPE has no table to run out of
        torch.testing.assert_close(model(idx, position_ids=torch.arange(25) + shift), base, atol=1e-5, rtol=0)


def test_rope_is_not_shift_invariant_with_learned_positions():
    """The shift test above can fail: with learned positions a shift changes the output."""
    model = GPT(tiny_config("learned")).eval()
    idx = torch.randint(0, 97, (1, 10))
    assert not torch.allclose(model(idx, position_ids=torch.arange(10) + 3), model(idx), atol=1e-4)


@pytest.mark.parametrize("pos,kv,win", list(itertools.product(POS, KV, WINDOWS)))
def test_cached_and_uncached_greedy_generation_identical(pos, kv, win):
    torch.manual_seed(4)
    model = GPT(tiny_config(pos, KV[kv], WINDOWS[win])).eval()
    # The prompt (12) is longer than the window (5) and so is the generation (30).
    prompt = torch.randint(0, 97, (2, 12))
    cached = model.generate(prompt, 30, temperature=0)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # Ragged prompts (left padding) decode as each prompt alone.
    prompts = [prompt[0, :3].tolist(), prompt[1].tolist()]
    batched = model.generate(prompts, 20, temperature=0)
    alone = [model.generate([p], 20, temperature=0)[0] for p in prompts]
    assert batched == alone


def test_per_layer_windows_with_a_global_layer():
    torch.manual_seed(5)
    config = tiny_config("rope", 2, [4, None])
    model = GPT(config).eval()
    prompt = torch.randint(0, 97, (1, 15))
    assert torch.equal(
        model.generate(prompt, 20, temperature=0), model.generate(prompt, 20, temperature=0, use_cache=False)
    )
    cache = model.new_cache(1, 100)
    assert cache[0].capacity == 4 and cache[1].capacity == 100


def test_prompt_in_two_chunks_equals_one_prefill():
    """A multi-token step into a ring that already holds tokens must still see the evicted keys it needs."""
    torch.manual_seed(6)
    model = GPT(tiny_config("rope", 2, 5)).eval()
    idx = torch.randint(0, 97, (2, 19))
    whole = model(idx)
    cache = model.new_cache(2, 19)
    first = model(idx[:, :8], cache=cache)
    second = model(idx[:, 8:], cache=cache)
    torch.testing.assert_close(torch.cat((first, second), dim=1), whole, atol=1e-5, rtol=0)


def test_rolling_cache_memory_is_constant_past_block_size():
    torch.manual_seed(7)
    config = tiny_config("rope", 1, 6, block_size=16)
    model = GPT(config).eval()
    cache = model.new_cache(1, capacity=10_000)
    sizes = {c.nbytes() for c in cache}
    assert sizes == {2 * 1 * 6 * 8 * 4}  # K and V: 1 kv head x 6 slots x 8 dims x fp32
    idx = torch.randint(0, 97, (1, 10))
    logits = model(idx, cache=cache)
    tokens = [idx]
    for _ in range(60):  # runs to 70 tokens, far past block_size 16
        nxt = logits[:, -1:].argmax(-1)
        tokens.append(nxt)
        logits = model(nxt, cache=cache)
        assert all(c.k.shape == (1, 1, 6, 8) and c.v.shape == (1, 1, 6, 8) for c in cache)
    # And the result equals recomputing without a cache.
    seq = torch.cat(tokens, dim=1)
    torch.testing.assert_close(logits[:, -1], model(seq)[:, -1], atol=1e-5, rtol=0)
    out = model.generate(idx, 60, temperature=0)
    assert torch.equal(out, model.generate(idx, 60, temperature=0, use_cache=False))


def test_kv_cache_holds_only_kv_heads():
    for n_kv in (4, 2, 1):
        model = GPT(tiny_config(n_kv_head=n_kv))
        cache = model.new_cache(3, 50)
        assert cache[0].k.shape == (3, n_kv, 50, 8)
        assert model.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * n_kv * 8, 32)


def test_convert_to_gqa_mean_pools_key_and_value_heads():
    torch.manual_seed(8)
    mha = GPT(tiny_config(n_kv_head=4))
    gqa = mha.convert_to_gqa(2)
    assert gqa.config.n_kv_head == 2
    hs, C = 8, 32
    for name in ("weight", "bias"):
        old = getattr(mha.transformer.h[1].attn.c_attn, name)
        new = getattr(gqa.transformer.h[1].attn.c_attn, name)
        torch.testing.assert_close(new[:C], old[:C])  # queries untouched
        for part in (0, 1):  # keys, then values
            src = old[C + part * 4 * hs : C + (part + 1) * 4 * hs]
            dst = new[C + part * 2 * hs : C + (part + 1) * 2 * hs]
            for g in range(2):
                expected = (src[2 * g * hs : (2 * g + 1) * hs] + src[(2 * g + 1) * hs : (2 * g + 2) * hs]) / 2
                torch.testing.assert_close(dst[g * hs : (g + 1) * hs], expected)
    torch.testing.assert_close(gqa.transformer.h[0].mlp.c_fc.weight, mha.transformer.h[0].mlp.c_fc.weight)
    mqa = mha.convert_to_gqa(1)
    assert mqa(torch.randint(0, 97, (1, 9))).shape == (1, 9, 97)
    with pytest.raises(GPT2LabError, match="must divide"):
        mha.convert_to_gqa(3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(window=0), "window must be None or an integer >= 1"),
        (dict(window=65), "larger than the context"),
        (dict(n_kv_head=3), "divisible by n_kv_head"),
        (dict(window=[4]), "window list has 1 entries"),
        (dict(pos_encoding="alibi"), "pos_encoding must be"),
    ],
)
def test_invalid_configs_fail_with_one_line(kwargs, message):
    with pytest.raises(GPT2LabError, match=message) as err:
        tiny_config(**kwargs)
    assert "\n" not in str(err.value)


def test_learned_positions_cannot_run_past_block_size():
    model = GPT(tiny_config(block_size=16))
    with pytest.raises(GPT2LabError, match="longer than the context"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 10)
    with pytest.raises(GPT2LabError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    rope = GPT(tiny_config("rope", block_size=16))
    assert rope.generate(torch.zeros(1, 10, dtype=torch.long), 10).shape == (1, 20)


def test_repeating_key_value_heads_gives_multi_head_attention_with_the_same_output():
    from gpt2lab.checkpoints.convert import pool_kv_heads, repeat_kv_heads

    torch.manual_seed(9)
    gqa = GPT(tiny_config(n_kv_head=2)).eval()
    config, state = repeat_kv_heads(gqa.config, gqa.state_dict())
    assert config.n_kv_head == config.n_head == 4
    mha = GPT(config).eval()
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(mha(idx), gqa(idx), atol=1e-6, rtol=0)
    # Query heads 0-1 read K/V head 0, heads 2-3 head 1: pooling each group back is the identity.
    _, pooled = pool_kv_heads(config, state, 2)
    assert torch.equal(
        pooled["transformer.h.1.attn.c_attn.weight"], gqa.state_dict()["transformer.h.1.attn.c_attn.weight"]
    )
