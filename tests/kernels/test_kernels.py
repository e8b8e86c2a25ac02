"""Kernel choice as a user sees it (`gpt2lab info --kernels`) and int8 weights."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from training_helpers import tiny_config

import gpt2lab.kernels.choice as kernel_choice
from gpt2lab import GPT, GPTConfig, quantize
from gpt2lab.cli.main import main
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval.loss import evaluate, load_tokens
from gpt2lab.train.loop import train

pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")  # conftest: no choice cached across tests


def test_info_kernels_lists_every_choice_with_the_times_that_decided_it(capsys, monkeypatch):
    """Each product shape of the tiny model's decode in fp32 and in bf16 (prompt rows and 1-row steps) and the
    training dtype appear once, the picked candidate being the fastest measured; a pin shows as pinned."""
    assert main(["info", "--config", "tiny", "--kernels", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    choices = report["choices"]
    assert report["cpu"]["model"] and report["threads"] >= 1
    shapes = {(c["operation"], c["shape"]) for c in choices}
    # 4 block shapes for the 8-token prompt and for 1-token steps, the head for the last row only
    assert len(shapes) == len(choices) == 2 * (4 + 4 + 1) + 1  # two dtypes, + the training dtype probe
    assert ("linear bf16", "<=1 rows, 64->192 +bias") in shapes and ("linear bf16", "<=8 rows, 256->64 +bias") in shapes
    assert ("linear fp32", "<=1 rows, 64->192 +bias") in shapes and ("linear fp32", "<=8 rows, 256->64 +bias") in shapes
    for c in choices:
        assert c["how"] == "measured" and c["picked"] == min(c["seconds"], key=c["seconds"].get)
    assert {"fp32", "bf16_autocast"} == set(choices[-1]["seconds"])

    monkeypatch.setenv(kernel_choice.ENV, "linear,fp32")
    kernel_choice.forget()
    assert main(["info", "--config", "tiny", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "GPT2LAB_KERNEL=linear,fp32" in out and "measured" not in out
    assert out.count(" pinned ") == len(choices)


# ---------------------------------------------------------------------------------------- int8 weights


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_int8_logits_follow_fp32_on_a_124m_shaped_model():
    """GPT-2 124M's shapes with random weights: every position's logits, int8 against fp32, cosine >= 0.99;
    every linear layer, the LM head included, holds int8 weights with one scale per output row."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        fp32 = model(idx)
        int8 = quantize(model, "int8")(idx)
    assert int8.shape == fp32.shape and int8.dtype == torch.float32
    assert _cosine(int8, fp32) >= 0.99
    layers = [m for m in model.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(layers) == 12 * 4 + 1 and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    head = model.lm_head.weight()
    assert head.dtype == torch.qint8 and head.q_per_channel_scales().shape == (50257,)
    row = model.transformer.wte.weight[7]  # symmetric: the row's largest magnitude spans half of int8's 255 steps
    torch.testing.assert_close(head.q_per_channel_scales()[7].float(), row.abs().max() / 127.5, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """A small model trained a little on the pydoc corpus: its predictions are far from uniform."""
    run = tmp_path_factory.mktemp("int8") / "run"
    train(tiny_config(corpus, run, "max_iters=150", "n_layer=2", "n_embd=64", "seq_len=32", "batch_size=4"))
    return run


def test_int8_perplexity_and_greedy_tokens_follow_fp32(trained_run, corpus):
    """Held-out perplexity within 1% of fp32's; greedy continuations of 16 prompts mostly identical."""
    from gpt2lab.loading import load_model

    fp32, int8 = load_model(trained_run).eval(), quantize(load_model(trained_run), "int8")
    tokens = load_tokens(corpus)[0]
    ppl = {name: evaluate(m, tokens, 32, 8, max_tokens=4096).perplexity for name, m in [("fp32", fp32), ("int8", int8)]}
    assert ppl["fp32"] < 1000  # trained: uniform would be 50257
    assert ppl["int8"] == pytest.approx(ppl["fp32"], rel=0.01)
    prompts = torch.from_numpy(tokens[: 16 * 8].astype("int64")).view(16, 8)
    same = (fp32.generate(prompts, 16, temperature=0) == int8.generate(prompts, 16, temperature=0)).all(dim=1)
    assert same.float().mean() >= 0.5


def test_int8_decoding_with_the_cache_matches_without():
    torch.manual_seed(0)
    model = quantize(GPT(GPTConfig.from_preset("tiny", vocab_size=300)), "int8")
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6]]  # ragged: left padding and masks
    assert model.generate(prompts, 10, temperature=0) == model.generate(prompts, 10, temperature=0, use_cache=False)


def test_int8_model_refuses_training_and_saving(tmp_path):
    model = quantize(GPT(GPTConfig.from_preset("tiny", vocab_size=300)), "int8")
    with pytest.raises(GPT2LabError, match="has int8 weights and cannot be trained"):
        model.train()
    with pytest.raises(GPT2LabError, match="int8 weights cannot be saved"):
        model.save_pretrained(tmp_path)
    with pytest.raises(GPT2LabError, match="unknown quantization 'int4'"):
        quantize(GPT(GPTConfig.from_preset("tiny", vocab_size=300)), "int4")


def test_cli_generate_and_eval_in_int8(trained_run, corpus, capsys):
    args = ["--model", str(trained_run)]
    assert (
        main(["generate", *args, "--prompt", "def", "--max-new-tokens", "5", "--temperature", "0", "--dtype", "int8"])
        == 0
    )
    assert capsys.readouterr().out.startswith("def")
    ppl = {}
    for dtype in ("float32", "int8"):
        assert main(["eval", *args, "--data", str(corpus), "--max-tokens", "1024", "--dtype", dtype]) == 0
        ppl[dtype] = float(capsys.readouterr().out.split("perplexity ")[1].split()[0])
    assert ppl["int8"] == pytest.approx(ppl["float32"], rel=0.01)
