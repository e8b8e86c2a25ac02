"""The gpt2lab command line: generate and convert, run as a user would (a subprocess, real exit codes)."""

import subprocess
import sys

import pytest
import torch

from gpt2lab import GPT, GPTConfig, load_tokenizer


def gpt2lab(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "gpt2lab", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    GPT(GPTConfig.from_preset("tiny")).save_pretrained(path)
    return path


@pytest.mark.parametrize("decoding", [[], ["--compile"]], ids=["eager", "compiled"])
def test_generate_streams_the_same_tokens_as_the_api(model_dir, decoding, monkeypatch):
    monkeypatch.setenv("GPT2LAB_KERNEL", "compiled")  # --compile's steps compiled, not measured against eager
    result = gpt2lab(
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "To be or not",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        *decoding,
    )
    assert result.returncode == 0, result.stderr
    assert "compiled decoding unavailable" not in result.stderr  # --compile must not fall back to eager steps
    tok = load_tokenizer()
    model = GPT.from_pretrained(model_dir)
    ids = tok.encode("To be or not")
    expected = tok.decode(model.generate([ids], 12, temperature=0)[0])
    assert result.stdout == expected + "\n"


def test_generate_reads_the_prompt_from_stdin_and_is_seeded(model_dir):
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "-",
        "--max-new-tokens",
        "10",
        "--seed",
        "3",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--temperature",
        "0.8",
    ]
    first, second = gpt2lab(*args, stdin="Hello there"), gpt2lab(*args, stdin="Hello there")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Hello there") and first.stdout == second.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--temperature", "-0.5"], "temperature must be a finite number >= 0"),
        (["--seed", "-1"], "seed must be an integer in [0, 4294967295]"),
    ],
)
def test_generate_errors_are_one_clear_line(model_dir, args, message):
    result = gpt2lab("generate", "--model", str(model_dir), "--prompt", "Hi", *args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_unknown_model(tmp_path):
    result = gpt2lab("generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:")


def test_convert_writes_a_gqa_model(model_dir, tmp_path):
    result = gpt2lab("convert", "--model", str(model_dir), "--n-kv-head", "1", "--out", str(tmp_path / "mqa"))
    assert result.returncode == 0, result.stderr
    converted = GPT.from_pretrained(tmp_path / "mqa")
    assert converted.config.n_kv_head == 1
    expected = GPT.from_pretrained(model_dir).convert_to_gqa(1)
    idx = torch.randint(0, 50257, (1, 8))
    torch.testing.assert_close(converted(idx), expected(idx))
    bad = gpt2lab("convert", "--model", str(model_dir), "--n-kv-head", "3", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "must divide" in bad.stderr


def test_export_writes_a_rope_gqa_model_transformers_runs_and_refuses_per_layer_windows(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("tiny", pos_encoding="rope", n_kv_head=2, window=32)).save_pretrained(tmp_path / "m")
    result = gpt2lab("export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "'starcoder2'" in result.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model = GPT.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 50257, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)

    GPT(GPTConfig.from_preset("tiny", pos_encoding="rope", window=[8, None])).save_pretrained(tmp_path / "p")
    bad = gpt2lab("export", "--model", str(tmp_path / "p"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "per-layer windows" in bad.stderr
    assert not (tmp_path / "x").exists()
