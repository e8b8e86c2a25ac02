"""Sampling rules, seeds, stop conditions and streaming."""

import pytest
import torch

from gpt2lab import GPT, GPT2LabError, GPTConfig, load_tokenizer
from gpt2lab.generation import sample_next, stream_text


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny")).eval()  # the GPT-2 vocabulary in a model small enough for tests


LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def draw(n=4000, **kw):
    g = torch.Generator().manual_seed(0)
    return torch.stack([sample_next(LOGITS, generator=g, **kw) for _ in range(n)]).flatten()


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(5, 100)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=1.7, top_k=1), logits.argmax(-1))


def test_top_k_and_top_p_keep_the_hand_computed_sets():
    assert set(draw(top_k=2).tolist()) == {0, 1}
    # Cumulative mass 0.5, 0.8, 0.95, 1.0: top_p=0.7 needs tokens {0, 1}; 0.5 needs only {0}; 0.9 {0, 1, 2}.
    assert set(draw(top_p=0.7).tolist()) == {0, 1}
    assert set(draw(top_p=0.5).tolist()) == {0}
    assert set(draw(top_p=0.9).tolist()) == {0, 1, 2}
    assert set(draw(top_p=1.0).tolist()) == {0, 1, 2, 3}


def test_temperature_reshapes_the_distribution():
    counts = torch.bincount(draw(n=20000, temperature=0.5), minlength=4).float() / 20000
    expected = torch.softmax(LOGITS[0] / 0.5, -1)
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)


def test_seed_makes_sampling_reproducible(model):
    prompt = torch.tensor([[464, 3290, 318]])
    a = model.generate(prompt, 20, seed=123)
    b = model.generate(prompt, 20, seed=123)
    c = model.generate(prompt, 20, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stop_token_ends_a_row_and_fills_it(model):
    prompt = torch.tensor([[464, 3290, 318], [40, 716, 257]])
    free = model.generate(prompt, 15, temperature=0)
    stop_tok = free[0, 3 + 4].item()  # the 5th token row 0 generates
    out = model.generate(prompt, 15, temperature=0, stop=[stop_tok])
    first = (free[0, 3:] == stop_tok).nonzero()[0].item()
    assert torch.equal(out[0, : 3 + first + 1], free[0, : 3 + first + 1])
    assert (out[0, 3 + first + 1 :] == 50256).all()
    ragged = model.generate([[464, 3290, 318]], 15, temperature=0, stop=[stop_tok])
    assert ragged[0] == free[0, : 3 + first + 1].tolist()


def test_stop_string_and_streaming(model):
    tok = load_tokenizer()
    prompt = "The meaning of life is"
    ids = tok.encode(prompt)
    full = "".join(stream_text(model, tok, prompt, 40, seed=1))
    expected_full = tok.decode(model.generate([ids], 40, seed=1)[0][len(ids) :])
    assert full == expected_full.split("<|endoftext|>")[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    pieces = list(stream_text(model, tok, prompt, 40, seed=1, stop=[stop]))
    assert len(pieces) > 1  # streamed, not returned at once
    assert "".join(pieces) == full[: full.index(stop)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be >= 1"),
    ],
)
def test_bad_sampling_arguments(model, kwargs, message):
    with pytest.raises(GPT2LabError, match=message):
        model.generate(torch.tensor([[1, 2]]), 3, **kwargs)


def test_prompt_longer_than_context(model):
    with pytest.raises(GPT2LabError, match="longer than the context"):
        model.generate(torch.zeros(1, 120, dtype=torch.long), 10)
