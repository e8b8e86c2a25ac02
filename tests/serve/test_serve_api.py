"""The server through OpenAI's own Python client: every answer is checked against gpt2lab itself
(generate, the model's log-softmax), which the server never calls."""

from __future__ import annotations

import threading

import pytest
import torch

from gpt2lab.generation import generate

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'gpt2lab[serve]'")
pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")

EOT = 50256


def reference(server, name: str, prompt: str, max_tokens: int, **sampling) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) from gpt2lab's own generate, the end-of-text token left out."""
    served = server.served[name]
    ids = served.tokenizer.encode(prompt)
    out = generate(served.model, [ids], max_tokens, stop=[EOT], **sampling)[0][len(ids) :]
    return ids, [t for t in out if t != EOT]


def decode(server, name: str, ids: list[int]) -> str:
    return server.served[name].tokenizer.decode(ids)


@pytest.mark.parametrize("name", ["tiny", "windowed"])
def test_greedy_completion_is_gpt2labs_own(server, client, name):
    result = client.completions.create(model=name, prompt="The quick brown fox", max_tokens=20, temperature=0)
    _, expected = reference(server, name, "The quick brown fox", 20, temperature=0)
    assert result.choices[0].text == decode(server, name, expected)
    assert result.choices[0].finish_reason == ("length" if len(expected) == 20 else "stop")
    assert result.usage.prompt_tokens == 4 and result.usage.completion_tokens == 20
    assert result.model == name and result.object == "text_completion"


def test_streamed_text_is_the_same_completion(server, client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0)
    chunks = list(
        client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0, stream=True)
    )
    assert len(chunks) >= 24  # one event per token, then the finish
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_string_cuts_the_text_before_it(server, client):
    full = client.completions.create(model="tiny", prompt="Hello there", max_tokens=30, temperature=0).choices[0].text
    stop = full[10:13]  # three characters from inside the greedy text
    assert stop and stop in full
    for stream in (False, True):
        answer = client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=30, temperature=0, stop=[stop], stream=stream
        )
        choices = [c.choices[0] for c in answer] if stream else answer.choices
        assert "".join(c.text for c in choices) == full[: full.index(stop)]
        assert choices[-1].finish_reason == "stop"


def test_seed_makes_sampling_reproducible_and_matches_gpt2lab(server, client):
    def sample(seed):
        return (
            client.completions.create(
                model="tiny", prompt="In a hole", max_tokens=16, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    _, expected = reference(server, "tiny", "In a hole", 16, temperature=1.0, top_p=0.9, seed=7)
    assert first == decode(server, "tiny", expected)


def test_logprobs_equal_gpt2labs_log_softmax(server, client):
    result = client.completions.create(model="tiny", prompt="Alice was", max_tokens=8, temperature=0, logprobs=5)
    lp = result.choices[0].logprobs
    served = server.served["tiny"]
    ids, new = reference(server, "tiny", "Alice was", 8, temperature=0)
    with torch.no_grad():
        logits = served.model(torch.tensor([ids + new]))[0]  # (T, vocab)
    expected = torch.log_softmax(logits.float(), dim=-1)[len(ids) - 1 : len(ids) - 1 + len(new)]
    assert len(lp.token_logprobs) == len(new) == 8
    for pos, token in enumerate(new):
        assert lp.token_logprobs[pos] == pytest.approx(float(expected[pos, token]), abs=1e-4)
        values, top = torch.topk(expected[pos], 5)
        got = lp.top_logprobs[pos]
        want = {served.tokenizer.decode([t]): v for t, v in zip(top.tolist(), values.tolist(), strict=True)}
        assert set(got) == set(want)
        assert all(got[k] == pytest.approx(want[k], abs=1e-4) for k in want)
    assert lp.tokens == [served.tokenizer.decode([t]) for t in new]
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(result.choices[0].text) - len(lp.tokens[-1])


def test_batched_results_equal_unbatched(server, client):
    prompts = ["A", "The cat sat on the mat and", "Why", "It was the best of times, it was"]
    texts = {}

    def ask(i):
        texts[i] = (
            client.completions.create(model="windowed", prompt=prompts[i], max_tokens=40 - 5 * i, temperature=0)
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, prompt in enumerate(prompts):
        _, expected = reference(server, "windowed", prompt, 40 - 5 * i, temperature=0)
        assert texts[i] == decode(server, "windowed", expected), prompt
    assert server.get("/health")[1]["models"]["windowed"]["peak_batch"] > 1  # they did share a batch


def test_a_list_of_prompts_gives_one_choice_each(server, client):
    prompts = ["First prompt", "A second, longer prompt here"]
    result = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in result.choices] == [0, 1]
    for choice, prompt in zip(result.choices, prompts, strict=True):
        assert choice.text == decode(server, "tiny", reference(server, "tiny", prompt, 6, temperature=0)[1])


def test_models_and_health(server, client):
    assert sorted(m.id for m in client.models.list().data) == ["tiny", "windowed"]
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok" and set(health["models"]) == {"tiny", "windowed"}
