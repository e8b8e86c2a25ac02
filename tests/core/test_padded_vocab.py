"""The padded vocabulary: rows of wte / lm_head past vocab_size that are no token. A padded model computes what
the unpadded model with the same real rows computes (logits, losses, gradients), never samples a padded id,
and leaves gpt2lab without its padding (every export is the unpadded model)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPT2LabError, GPTConfig
from gpt2lab.checkpoints import read_checkpoint
from gpt2lab.config import padded_vocab
from gpt2lab.kernels.lm_head_loss import LanguageModelLoss, LMHeadLoss

V, VP = 50, 64  # a real vocabulary and its padding to a multiple of 64
CONFIG = GPTConfig.from_preset("tiny", vocab_size=V)


def _pair(seed: int = 0, **fields) -> tuple[GPT, GPT]:
    """(unpadded, padded) models with the same real weights; the padded rows hold huge values, so that any
    path that let them into a softmax would be dominated by them."""
    config = CONFIG.replace(**fields)
    torch.manual_seed(seed)
    plain = GPT(config)
    padded = GPT(config.replace(padded_vocab_size=VP))
    state = plain.state_dict()
    wte = torch.cat([state["transformer.wte.weight"], 1000.0 * state["transformer.wte.weight"][: VP - V]])
    padded.load_state_dict({**state, "transformer.wte.weight": wte, "lm_head.weight": wte})
    return plain, padded


def test_the_padding_is_validated_and_spelled_one_way():
    assert (padded_vocab(50257, 64), padded_vocab(65, 64), padded_vocab(128, 64), padded_vocab(65, 1)) == (
        50304,
        128,
        None,
        None,
    )
    assert GPTConfig(vocab_size=V, padded_vocab_size=V).padded_vocab_size is None  # equal: no padding
    assert GPTConfig(vocab_size=V, padded_vocab_size=VP).vocab_rows == VP
    assert GPTConfig(vocab_size=V).vocab_rows == V
    for bad in (V - 1, 0, 64.5, "64", True):
        with pytest.raises(GPT2LabError, match="padded_vocab_size must be unset or an integer >= vocab_size 50"):
            GPTConfig(vocab_size=V, padded_vocab_size=bad)
    config = GPTConfig(vocab_size=V, padded_vocab_size=VP)
    assert GPTConfig.from_dict(config.to_dict()) == config and config.unpadded() == GPTConfig(vocab_size=V)


def test_a_padded_model_starts_from_the_unpadded_models_weights():
    """The padded rows take no random numbers: with one seed, every real weight is the unpadded model's, and
    the padding starts at zero. The tie holds, and the head's shapes say Vp."""
    torch.manual_seed(3)
    plain = GPT(CONFIG)
    torch.manual_seed(3)
    padded = GPT(CONFIG.replace(padded_vocab_size=VP))
    assert padded.lm_head.weight is padded.transformer.wte.weight
    assert padded.lm_head.weight.shape == (VP, 64) and padded.lm_head.out_features == VP
    assert padded.transformer.wte.num_embeddings == VP
    a, b = plain.state_dict(), padded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if name in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(b[name][:V], a[name]) and not b[name][V:].any(), name
        else:
            assert torch.equal(b[name], a[name]), name


@pytest.mark.parametrize("fields", [{}, {"pos_encoding": "rope", "n_kv_head": 2}])
def test_padded_and_unpadded_models_give_equal_logits_losses_and_gradients(fields):
    """forward, decode_step, model.loss and the training loss: the padded model's equal the unpadded one's,
    its logits have V columns, and its padded rows get a gradient of exactly zero (huge as they are, they are
    in no softmax)."""
    plain, padded = _pair(**fields)
    idx = torch.randint(0, V, (2, 11))
    targets = torch.randint(0, V, (2, 11))
    targets[0, :4] = -1
    logits = padded(idx)
    assert logits.shape == (2, 11, V)
    torch.testing.assert_close(logits, plain(idx), rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.loss(idx, targets), plain.loss(idx, targets), rtol=0, atol=1e-6)
    caches = [m.new_cache(2, 16) for m in (plain, padded)]
    for model, cache in zip((plain, padded), caches, strict=True):
        model(idx[:, :5], cache=cache)
    steps = [m.decode_step(idx[:, 5:6], torch.tensor([5]), c) for m, c in zip((plain, padded), caches, strict=True)]
    assert steps[1].shape == (2, 1, V)
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-5)
    grads = []
    for model in (plain, padded):
        loss = LanguageModelLoss(model)(idx, targets)
        torch.testing.assert_close(loss, F.cross_entropy(plain(idx).flatten(0, 1), targets.flatten(), ignore_index=-1))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        got = grads[1][name]
        if name == "transformer.wte.weight":
            assert torch.equal(got[V:], torch.zeros_like(got[V:]))
            got = got[:V]
        torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_chunked_loss_of_a_padded_model_is_the_same_at_any_chunk_size(monkeypatch):
    plain, padded = _pair(1)
    idx, targets = torch.randint(0, V, (3, 9)), torch.randint(0, V, (3, 9))
    expected = plain.loss(idx, targets)
    for rows in (1, 5, 27):
        monkeypatch.setattr(LMHeadLoss, "CHUNK_BYTES", 4 * VP * rows)
        torch.testing.assert_close(LanguageModelLoss(padded)(idx, targets), expected, rtol=0, atol=1e-6)


def test_padded_ids_are_never_sampled():
    """The padded rows are 1000 times real rows, so the head's raw output puts a padded column on top at
    every position (checked): sampled, greedy, top-k and top-p generation still emit real ids only, as the
    unpadded model does."""
    plain, padded = _pair(2)
    prompts = torch.randint(0, V, (4, 3))
    for options in ({"temperature": 0}, {"temperature": 1.0, "seed": 1}, {"top_k": 5, "seed": 2}, {"top_p": 0.9}):
        out = padded.generate(prompts, 40, **options)
        assert int(out.max()) < V, options
        if options.get("temperature") == 0 or "seed" in options:
            assert torch.equal(out, plain.generate(prompts, 40, **options)), options
    with torch.no_grad():
        raw = padded.lm_head(padded.hidden_states(out))  # (B, T, Vp): what an uncut head would sample from
    assert (raw[..., V:].amax(-1) > raw[..., :V].amax(-1)).all()


def test_every_export_of_a_padded_model_is_the_unpadded_model(tmp_path):
    """save_pretrained (gpt2lab's format) and export_hf write V rows and no padding in the config; what they
    hold reads back as the unpadded model, with its logits."""
    plain, padded = _pair(4)
    idx = torch.randint(0, V, (2, 7))
    for name, write in (("native", padded.save_pretrained), ("hf", padded.export_hf)):
        write(tmp_path / name)
        config, state = read_checkpoint(tmp_path / name)
        assert config.padded_vocab_size is None and state["transformer.wte.weight"].shape == (V, 64), name
        loaded = GPT.from_pretrained(tmp_path / name).eval()
        assert torch.equal(loaded.transformer.wte.weight, plain.transformer.wte.weight), name
        torch.testing.assert_close(loaded(idx), padded.eval()(idx), rtol=0, atol=1e-5, msg=name)


def test_the_hf_export_of_a_padded_model_runs_in_transformers_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    _, padded = _pair(5)
    padded.export_hf(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, padded.eval()(idx), rtol=0, atol=1e-4)


def test_the_gguf_export_of_a_padded_model_is_the_unpadded_models(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gpt2lab.tokenizer import CharTokenizer

    plain, padded = _pair(6)
    chars = CharTokenizer("".join(chr(c) for c in range(65, 65 + V)))
    tensors = []
    for name, model in (("plain", plain), ("padded", padded)):
        model.export_gguf(tmp_path / f"{name}.gguf", chars)
        tensors.append({t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / f"{name}.gguf").tensors})
    assert tensors[0].keys() == tensors[1].keys()
    for name in tensors[0]:
        assert np.array_equal(tensors[1][name], tensors[0][name]), name
