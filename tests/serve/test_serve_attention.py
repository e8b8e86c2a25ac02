"""The page's attention pattern, computed outside the model, against the model itself: the pattern of
every head, applied to the layer's values and projection, must give back the layer's own output (which the
model computes with SDPA or the banded kernel, never with these probabilities)."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.serve.attention_view import attention_pattern, layer_input

SHAPES = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=97),
    "rope-gqa-window": dict(
        n_layer=3,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        block_size=64,
        vocab_size=97,
        pos_encoding="rope",
        window=[5, None, 3],
    ),
    "mqa": dict(n_layer=1, n_head=4, n_kv_head=1, n_embd=32, block_size=64, vocab_size=97, window=4),
}


def layer_output(model, ids, layer) -> torch.Tensor:
    """What the layer's attention module returns, (1, T, C), recorded by a forward hook."""
    seen = {}
    handle = model.transformer.h[layer].attn.register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    return seen["y"]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_patterns_of_all_heads_rebuild_the_layers_output(shape):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape])).eval()
    ids = torch.randint(0, 97, (20,)).tolist()
    for layer in range(model.config.n_layer):
        attn = model.transformer.h[layer].attn
        x, positions = layer_input(model, ids, layer)
        hs, nh, nkv = attn.head_dim, attn.n_head, attn.n_kv_head
        v = attn.c_attn(x)[..., (nh + nkv) * hs :].view(20, nkv, hs)  # (T, nkv, hs)
        heads = []
        for head in range(nh):
            pattern = attention_pattern(model, x, positions, layer, head)  # (T, T)
            heads.append(pattern @ v[:, head // (nh // nkv)])  # (T, hs)
        rebuilt = attn.c_proj(torch.cat(heads, dim=-1))[None]
        assert torch.allclose(rebuilt, layer_output(model, ids, layer), atol=1e-5), (shape, layer)


def test_a_window_shows_as_a_band():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES["rope-gqa-window"])).eval()
    ids = torch.randint(0, 97, (12,)).tolist()
    x, positions = layer_input(model, ids, 2)
    pattern = attention_pattern(model, x, positions, 2, 1)
    q, k = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    inside = (k <= q) & (k > q - 3)  # window 3: the key itself and the two before it
    assert torch.all(pattern[~inside] == 0) and torch.all(pattern[inside] > 0)
    assert torch.allclose(pattern.sum(-1), torch.ones(12))


def test_hand_computed_pattern_of_one_head():
    """A one-head model whose query/key projection is set by hand: scores are q·k/sqrt(hs), softmaxed."""
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=2, block_size=8, vocab_size=5)).eval()
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight.zero_()
        attn.c_attn.bias.zero_()
        attn.c_attn.weight[0:2] = torch.eye(2)  # q = x
        attn.c_attn.weight[2:4] = 2 * torch.eye(2)  # k = 2x
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    pattern = attention_pattern(model, x, torch.arange(3), 0, 0)
    # row 2: scores 2·(1,1)·(1,0)/sqrt2, 2·(1,1)·(0,1)/sqrt2, 2·(1,1)·(1,1)/sqrt2 = sqrt2, sqrt2, 2·sqrt2
    e = torch.exp(torch.tensor([2**0.5, 2**0.5, 2 * 2**0.5]))
    assert torch.allclose(pattern[2], e / e.sum())
    # row 1: scores 0 (key 0) and sqrt2 (key 1); key 2 is in the future
    row1 = torch.softmax(torch.tensor([0.0, 2**0.5]), 0)
    assert torch.allclose(pattern[1], torch.cat([row1, torch.zeros(1)]))
    assert pattern[0].tolist() == [1.0, 0.0, 0.0]


def test_the_attention_route_serves_the_windowed_band(server):
    status, view = server.post(
        "/v1/attention",
        {"model": "windowed", "prompt": "one two three four five six seven eight nine ten", "layer": 1, "head": 3},
    )
    assert status == 200 and view["window"] == 6 and len(view["tokens"]) == 10
    weights = torch.tensor(view["weights"])
    served = server.served["windowed"]
    ids = served.tokenizer.encode("one two three four five six seven eight nine ten")
    x, positions = layer_input(served.model, ids, 1)
    assert torch.allclose(weights, attention_pattern(served.model, x, positions, 1, 3), atol=1e-4)
    assert weights[9, :4].sum() == 0 and weights[9, 4:].sum() > 0.99
