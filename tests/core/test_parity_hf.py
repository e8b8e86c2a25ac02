"""Proof of equality with transformers' GPT-2, the reference implementation.

A random ``transformers.GPT2LMHeadModel`` saved in each hub layout loads into gpt2lab with the same
logits (<= 1e-4), the same loss (<= 1e-5) and the same greedy continuation, token for token, with
and without either side's KV cache; and a gpt2lab model exported with ``export_hf`` loads into
transformers with no missing or unexpected keys and the same logits.
"""

from __future__ import annotations

import pytest
import torch

from gpt2lab import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

# initializer_range 0.2 gives the tiny model logits with a std of about 1.5: large enough that every
# tensor's mapping shows in them and that greedy decoding does not collapse to one token.
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=512, initializer_range=0.2)
NEW_TOKENS = 32


def random_hf(seed: int = 0, **config) -> transformers.GPT2LMHeadModel:
    """A random transformers GPT-2 in eval mode.

    transformers initialises biases to 0 and LayerNorms to 1/0, which would hide a loader that drops
    or swaps them, so those are perturbed too. bos/eos are unset: transformers' generate stops at eos
    and gpt2lab's does not, so a greedy run that reached token 50256 would compare different things.
    """
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**config, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(vocab_size: int, length: int) -> torch.Tensor:
    return torch.randint(vocab_size, (2, length), generator=torch.Generator().manual_seed(1))


def assert_same_logits_and_loss(hf, model: GPT, idx: torch.Tensor) -> None:
    with torch.no_grad():
        ref = hf(idx, labels=idx)  # transformers shifts the labels inside: position t predicts idx[t + 1]
        # The same targets, shifted here; the last position has no next token and is ignored (-1).
        targets = torch.cat((idx[:, 1:], torch.full_like(idx[:, :1], -1)), dim=1)
        logits, loss = model(idx), model.loss(idx, targets)
    assert ref.logits.std() > 0.5  # not a degenerate random model
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


def assert_same_greedy_generation(hf, model: GPT, prompt: torch.Tensor) -> None:
    """transformers with and without its cache, gpt2lab with and without its cache: one sequence."""
    runs = {}
    for use_cache in (True, False):
        runs[f"hf cache={use_cache}"] = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )
    for use_cache in (True, False):
        runs[f"gpt2lab cache={use_cache}"] = model.generate(prompt, NEW_TOKENS, temperature=0, use_cache=use_cache)
    reference = runs["hf cache=True"]
    assert reference.shape == (prompt.shape[0], prompt.shape[1] + NEW_TOKENS)
    assert len(set(reference[0, prompt.shape[1] :].tolist())) > 3  # a real continuation, not one repeated token
    for name, tokens in runs.items():
        assert torch.equal(tokens, reference), name


def save_bin_lm_head(hf, folder) -> None:
    """pytorch_model.bin as GPT2LMHeadModel's state dict: "transformer." prefix, tied lm_head included
    (transformers 5 always writes safetensors, so the .bin is written by hand)."""
    hf.config.save_pretrained(folder)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")


def save_bin_gpt2model_legacy(hf, folder) -> None:
    """pytorch_model.bin as older GPT2Model checkpoints: no prefix, no lm_head, with the causal-mask
    buffers (attn.bias, attn.masked_bias) that transformers used to save."""
    hf.config.save_pretrained(folder)
    state = dict(hf.transformer.state_dict())
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")


LAYOUTS = {
    "safetensors": lambda hf, folder: hf.save_pretrained(folder),
    "bin-lm-head": save_bin_lm_head,
    "bin-gpt2model-legacy": save_bin_gpt2model_legacy,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_transformers_gpt2_loads_with_the_same_logits_and_loss(tmp_path, layout):
    hf = random_hf(**TINY)
    LAYOUTS[layout](hf, tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.config.block_size == 64 and model.config.vocab_size == 512
    assert_same_logits_and_loss(hf, model, batch(512, 48))


def test_tiny_transformers_gpt2_greedy_generation_is_identical(tmp_path):
    hf = random_hf(**TINY)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    assert_same_greedy_generation(hf, model, batch(512, 8)[:1])


def test_export_hf_loads_in_transformers_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.2 if p.dim() > 1 else 0.1)
    model.export_hf(tmp_path)
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied on their side too
    assert_same_logits_and_loss(hf, model, batch(512, 48))
    assert_same_greedy_generation(hf, model, batch(512, 8)[:1])


@pytest.mark.slow
def test_gpt2_124m_random_matches_transformers(tmp_path):
    """The full GPT-2 small shape (transformers' default config) once: 12 layers, 768 wide, 50257 tokens.

    initializer_range 0.05 instead of 0.02: with 0.02 the logits' std is about 0.5 and greedy decoding
    repeats one token, which would prove little.
    """
    hf = random_hf(initializer_range=0.05)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.config == GPTConfig.from_preset("gpt2")
    assert_same_logits_and_loss(hf, model, batch(50257, 64))
    assert_same_greedy_generation(hf, model, batch(50257, 8)[:1])


@pytest.mark.parametrize("activation, hf_name", [("gelu_tanh", "gelu_new"), ("gelu", "gelu"), ("relu", "relu")])
def test_each_activation_matches_transformers_both_ways(tmp_path, activation, hf_name):
    """transformers' GPT-2 with activation_function hf_name loads as gpt2lab's activation, and back."""
    hf = random_hf(**TINY, activation_function=hf_name)
    hf.save_pretrained(tmp_path / "from_hf")
    model = GPT.from_pretrained(tmp_path / "from_hf").eval()
    assert model.config.activation == activation
    assert_same_logits_and_loss(hf, model, batch(512, 48))

    model.export_hf(tmp_path / "to_hf")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "to_hf").eval()
    assert back.config.activation_function == hf_name
    assert_same_logits_and_loss(back, model, batch(512, 48))


# gpt2lab variant -> the transformers class export_hf writes it as. Sequences are longer than the windows
# so the window bites, and an off-by-one in its convention would show in the logits.
EXPORTED_VARIANTS = {
    "gqa-learned": (dict(n_kv_head=2), "GPT2LMHeadModel"),
    "mqa-learned": (dict(n_kv_head=1, activation="gelu"), "GPTBigCodeForCausalLM"),
    "rope-mha": (dict(pos_encoding="rope", rope_theta=500.0), "Starcoder2ForCausalLM"),
    "rope-gqa-window": (dict(pos_encoding="rope", n_kv_head=2, window=16), "Starcoder2ForCausalLM"),
    "rope-mqa-window-relu": (
        dict(pos_encoding="rope", n_kv_head=1, window=[8, 8], activation="relu"),
        "Starcoder2ForCausalLM",
    ),
}


def random_gpt2lab(**variant) -> GPT:
    """A tiny gpt2lab model with every tensor random (LayerNorms around 1, biases non-zero), in eval mode."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512, **variant)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.2 if p.dim() > 1 else 0.1)
    return model


@pytest.mark.parametrize("variant", EXPORTED_VARIANTS)
def test_exported_variant_loads_in_transformers_with_the_same_logits(tmp_path, variant):
    fields, hf_class = EXPORTED_VARIANTS[variant]
    model = random_gpt2lab(**fields)
    model_type = model.export_hf(tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == hf_class and hf.config.model_type == model_type
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert_same_logits_and_loss(hf, model, batch(512, 48))
    if model.config.window is not None:  # transformers' sliding cache against gpt2lab's ring of W slots
        assert_same_greedy_generation(hf, model, batch(512, 8)[:1])
