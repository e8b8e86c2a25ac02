"""The GPT-2 model itself: sizes, presets, initialisation, loss."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt2lab
import gpt2lab.kernels.cpu_linear as cpu_linear
from gpt2lab import GPT, PRESETS, GPT2LabError, GPTConfig
from gpt2lab.config import ACTIVATIONS
from gpt2lab.kernels.cpu_linear import swap_linear_layers
from gpt2lab.kernels.lm_head_loss import LanguageModelLoss, LMHeadLoss, lm_head_loss
from gpt2lab.kernels.quantize import Int8Linear
from gpt2lab.loading import load_model_and_tokenizer


def test_gpt2_preset_has_exactly_124_439_808_parameters():
    config = GPTConfig.from_preset("gpt2")
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (
        12,
        12,
        768,
        1024,
        50257,
    )
    model = GPT(config)
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: counted once


@pytest.mark.parametrize(
    "name,expected", [("gpt2-medium", (24, 16, 1024)), ("gpt2-large", (36, 20, 1280)), ("gpt2-xl", (48, 25, 1600))]
)
def test_larger_presets(name, expected):
    c = GPTConfig.from_preset(name)
    assert (c.n_layer, c.n_head, c.n_embd) == expected
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


def test_unknown_preset_and_key_suggest_the_closest():
    with pytest.raises(GPT2LabError, match="did you mean 'gpt2-xl'"):
        GPTConfig.from_preset("gpt2-xxl")
    with pytest.raises(GPT2LabError, match="did you mean 'n_kv_head'"):
        GPTConfig.from_dict({"n_kv_heads": 2})


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000))
    h = model.transformer.h[0]
    assert abs(h.mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    assert abs(h.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(2 * 8)) < 5e-4
    assert abs(h.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(2 * 8)) < 5e-4
    assert torch.count_nonzero(h.attn.c_attn.bias) == 0
    assert torch.equal(h.ln_1.weight, torch.ones(256))


def test_forward_returns_logits_only_and_loss_is_the_mean_cross_entropy():
    """forward has one result: logits (B, T, vocab), or (B, 1, vocab) with last_only; model.loss is the
    hand-computed mean negative log-likelihood, ignoring targets of -1."""
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50))
    idx = torch.randint(0, 50, (3, 17))
    targets = torch.randint(0, 50, (3, 17))
    logits = model(idx)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 17, 50)
    torch.testing.assert_close(model(idx, last_only=True), logits[:, -1:])
    with pytest.raises(TypeError):
        model(idx, targets)  # the loss is not forward's: model.loss, or the chunked head loss
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(model.loss(idx, targets), nll)
    targets[0, :5] = -1  # ignored positions
    torch.testing.assert_close(model.loss(idx, targets), F.cross_entropy(logits[targets >= 0], targets[targets >= 0]))


def test_hidden_states_are_what_the_head_multiplies():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50, pos_encoding="rope", n_kv_head=2)).eval()
    idx = torch.randint(0, 50, (2, 9))
    hidden = model.hidden_states(idx)
    assert hidden.shape == (2, 9, 64)
    torch.testing.assert_close(hidden @ model.transformer.wte.weight.T, model(idx))


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_loss_without_logits_equals_the_dense_loss_and_its_gradients(chunk_rows, monkeypatch):
    """The chunked head + cross-entropy applied from outside (training's path: hidden states, then
    lm_head_loss, through LanguageModelLoss) against logits + F.cross_entropy, including ignored targets,
    a scaled loss (gradient accumulation) and the tied embedding's two gradients."""
    monkeypatch.setattr(LMHeadLoss, "CHUNK_BYTES", 4 * 50 * chunk_rows)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50))
    idx, targets = torch.randint(0, 50, (3, 17)), torch.randint(0, 50, (3, 17))
    targets[1, 3:9] = -1
    dense_loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    chunked_loss = LanguageModelLoss(model)(idx, targets)
    torch.testing.assert_close(chunked_loss, dense_loss, rtol=0, atol=1e-6)
    grads = []
    for loss in (dense_loss, chunked_loss):
        model.zero_grad()
        (loss / 3).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        hidden = model.hidden_states(idx)
        torch.testing.assert_close(lm_head_loss(hidden, model.lm_head.weight, targets), dense_loss, rtol=0, atol=1e-6)
        assert lm_head_loss(hidden, model.lm_head.weight, torch.full_like(targets, -1)).isnan()


def test_lm_head_is_tied_to_the_token_embedding():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50))
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.is_contiguous()
    assert sum(p.numel() for p in model.parameters()) == model.num_params()
    half = model.to(torch.bfloat16)
    assert half.lm_head.weight is half.transformer.wte.weight


def test_causality_future_tokens_do_not_change_past_logits():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50, pos_encoding="rope", window=5)).eval()
    idx = torch.randint(0, 50, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 50
    torch.testing.assert_close(model(idx)[:, :12], model(changed)[:, :12])
    assert not torch.allclose(model(idx)[:, 12:], model(changed)[:, 12:])


def test_config_roundtrip_through_json():
    c = GPTConfig.from_preset("tiny", pos_encoding="rope", n_kv_head=2, window=[8, None])
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_full_spells_a_global_layer():
    """TOML has no null: "full" stands for a layer (or a model) without a window."""
    assert GPTConfig.from_preset("tiny", window=[8, "full"]).window == [8, None]
    assert GPTConfig.from_preset("tiny", window="full").window is None


def test_activation_is_chosen_by_name_and_an_unknown_one_is_one_line():
    x = torch.linspace(-4, 4, 101)
    expected = {  # hand-written formulas, independent of torch's implementations
        "gelu_tanh": 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        "gelu": 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
        "relu": torch.where(x > 0, x, torch.zeros_like(x)),
    }
    assert set(expected) == set(ACTIVATIONS)
    for name, want in expected.items():
        mlp = GPT(GPTConfig.from_preset("tiny", vocab_size=50, activation=name)).transformer.h[0].mlp
        torch.testing.assert_close(mlp.activation(x), want, atol=1e-6, rtol=0)
    with pytest.raises(GPT2LabError, match="activation must be one of gelu_tanh, gelu, relu, got 'rleu'") as e:
        GPTConfig.from_preset("tiny", activation="rleu")
    assert "\n" not in str(e.value) and "did you mean 'relu'" in str(e.value)


# ---------------------------------------------------------------------------------------- plain model, kernels outside


def test_model_and_attention_import_nothing_from_kernels_nor_private_torch():
    """The model files read like the paper: no gpt2lab.kernels, no torch._* or torch.ops anywhere in them."""
    source_dir = Path(gpt2lab.__file__).parent
    for name in ("model.py", "attention.py"):
        text = (source_dir / name).read_text()
        tree = ast.parse(text)
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.startswith(("gpt2lab.kernels", "torch._"))], name
        assert "torch.ops" not in text and "torch._" not in text, name


def test_a_plain_gpt_is_built_from_nn_linear_only():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50, pos_encoding="rope", n_kv_head=2, window=[8, None]))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1 and all(type(m) is torch.nn.Linear for m in linears)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_cpu_kernels_give_the_plain_model_logits(dtype):
    """swap_linear_layers keeps the parameters (and the tie); the logits match plain nn.Linear's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=300)).to(dtype).eval()
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        plain = model(idx).float()
        names = {n: p for n, p in model.named_parameters()}
        swap_linear_layers(model)
        assert {n: p for n, p in model.named_parameters()} == names
        assert model.lm_head.weight is model.transformer.wte.weight
        assert all(type(m) is cpu_linear.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: about one rounding
        torch.testing.assert_close(model(idx).float(), plain, atol=tolerance, rtol=tolerance)


def test_inference_loading_swaps_kernels_only_where_they_win(tmp_path):
    """load_model_and_tokenizer (generate, eval) applies the kernels: fp32 and bf16 get the measured CPU
    layer, int8 the quantized one; the logits follow the plain model's."""
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("tiny")).save_pretrained(tmp_path)
    reference = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (1, 10))
    kinds = {"float32": cpu_linear.Linear, "bfloat16": cpu_linear.Linear, "int8": Int8Linear}
    for dtype, kind in kinds.items():
        model, _ = load_model_and_tokenizer(tmp_path, dtype=dtype)
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear | Int8Linear)]
        assert not model.training and len(layers) == 2 * 4 + 1 and all(type(m) is kind for m in layers), dtype
        with torch.no_grad():
            cosine = F.cosine_similarity(model(idx).double().flatten(), reference(idx).double().flatten(), dim=0)
        assert cosine > (0.999999 if dtype == "float32" else 0.99), dtype


def test_decode_step_at_an_explicit_index_gives_the_cached_forward_logits():
    """Compiled decoding's path run eagerly: each step written at the index it is given (the ring of a
    window of 5 wraps), no flag on the cache, the same logits as the eager cached forward."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=97, pos_encoding="rope", n_kv_head=2, window=5)).eval()
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        eager, static = model.new_cache(1, 20), model.new_cache(1, 20)
        model(idx, cache=eager)
        model(idx, cache=static)
        for step, token in enumerate((3, 50, 7, 96, 0, 11)):
            tokens = torch.tensor([[token]])
            logits = model.decode_step(tokens, torch.tensor([9 + step]), static)
            for layer in static:  # the caller (CompiledDecoder) advances the lengths
                layer.length += 1
            assert logits.shape == (1, 1, 97)
            torch.testing.assert_close(logits, model(tokens, cache=eager), atol=1e-5, rtol=0)
    assert not hasattr(static[0], "step_index")
