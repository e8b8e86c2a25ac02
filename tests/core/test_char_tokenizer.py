"""Character-level tokenization end to end: the vocabulary and its round trip, the unknown-character error,
prepare --tokenizer char -> train -> generate / eval / convert reading and writing characters, and the
mismatches (a model and data with different tokenizers) refused on one line."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from training_helpers import tiny_config

from gpt2lab import GPT, GPTConfig, load_tokenizer
from gpt2lab.cli.main import main
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.outputs import TOKENIZER_FILE
from gpt2lab.tokenizer import CharTokenizer, save_tokenizer
from gpt2lab.train.loop import train

# A small corpus whose character set is known by construction: the first 20,000 characters of a play.
SPEECH = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
CORPUS = (SPEECH + "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n\n") * 80


def gpt2lab(*args):
    return subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("char")
    (folder / "play.txt").write_text(CORPUS, encoding="utf-8")
    assert main(["prepare", str(folder / "play.txt"), "--tokenizer", "char", "--out", str(folder / "data")]) == 0
    return folder / "data"


@pytest.fixture(scope="module")
def char_run(char_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(char_data, out, "max_iters=3", "model.block_size=512"), overwrite=True)
    return out


def test_tinyshakespeare_vocabulary_and_round_trip(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.from_texts([text])
    assert tok.n_vocab == 65 == len(set(text))
    assert tok.chars == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    ids = tok.encode_ordinary(text)
    assert len(ids) == len(text) and ids[:3] == [tok.chars.index(c) for c in text[:3]]
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_round_trip_of_any_text_over_its_own_characters(text):
    tok = CharTokenizer.from_texts([text])
    ids = tok.encode_ordinary(text)
    assert [tok.chars[i] for i in ids] == list(text)  # one id per character, in sorted-vocabulary order
    assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode("utf-8")


def test_unknown_character_names_it():
    tok = CharTokenizer("\nabc")
    assert tok.encode("cab\n") == [3, 1, 2, 0]  # sorted: "\n" < "a" < "b" < "c"
    with pytest.raises(GPT2LabError, match=r"the character 'é' \(U\+00E9, character 2 of the text\)"):
        tok.encode("abéc")
    with pytest.raises(GPT2LabError, match="token id 4 is outside the 4-character vocabulary"):
        tok.decode([0, 4])


def test_prepared_folder_carries_the_vocabulary(char_data):
    data = TokenData.open(char_data)
    assert data.meta["tokenizer"] == "char" and data.vocab_size == len(set(CORPUS)) == data.tokenizer.n_vocab
    assert data.tokenizer == load_tokenizer(char_data) == CharTokenizer.from_texts([CORPUS])
    stream = np.concatenate([data.train, data.val])
    assert data.tokenizer.decode(stream.tolist()) == CORPUS  # no separator token: the text itself
    assert data.meta["train_bytes"] + data.meta["val_bytes"] == len(CORPUS.encode())


def test_train_takes_the_vocabulary_from_the_data_and_generates_corpus_characters(char_run):
    assert GPT.from_pretrained(char_run).config.vocab_size == len(set(CORPUS))
    assert load_tokenizer(char_run) == load_tokenizer(char_run / "ckpt.pt") == CharTokenizer.from_texts([CORPUS])
    result = gpt2lab("generate", "--model", str(char_run), "--prompt", "ROMEO:\n", "--max-new-tokens", "300")
    assert result.returncode == 0, result.stderr
    text = result.stdout.removesuffix("\n")
    assert text.startswith("ROMEO:\n") and len(text) == len("ROMEO:\n") + 300  # one character per token
    assert set(text) <= set(CORPUS)


def test_unknown_prompt_character_is_one_line_exit_2(char_run):
    result = gpt2lab("generate", "--model", str(char_run), "--prompt", "Romeo & Juliet")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "the character '&' (U+0026" in result.stderr


def test_eval_scores_characters(char_run, char_data, tmp_path, capsys):
    (tmp_path / "held_out.txt").write_text(SPEECH * 4)
    assert main(["eval", "--model", str(char_run), "--data", str(tmp_path / "held_out.txt"), "--context", "32"]) == 0
    out = capsys.readouterr().out
    n = len(SPEECH * 4)
    assert f"({n:,} tokens, {n:,} bytes)" in out  # one token per character, one byte per (ASCII) character
    loss, bpb = (float(out.split(name)[1].split()[0]) for name in ("loss ", "bits/byte "))
    assert bpb == pytest.approx(loss / math.log(2), abs=2e-4)
    assert main(["eval", "--model", str(char_run), "--data", str(char_data), "--context", "32"]) == 0


def test_convert_carries_the_tokenizer(char_run, tmp_path):
    assert main(["convert", "--model", str(char_run), "--n-kv-head", "1", "--out", str(tmp_path / "mqa")]) == 0
    assert load_tokenizer(tmp_path / "mqa") == load_tokenizer(char_run)


def test_mismatched_tokenizers_are_refused(char_run, char_data, corpus, tmp_path, capsys):
    bpe_model = tmp_path / "bpe"
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)).save_pretrained(bpe_model)
    assert main(["eval", "--model", str(bpe_model), "--data", str(char_data)]) == 2
    assert (
        "prepared with characters (38 tokens) but the model reads GPT-2 BPE (50257 tokens)" in capsys.readouterr().err
    )
    assert main(["eval", "--model", str(char_run), "--data", str(corpus)]) == 2
    assert "prepared with GPT-2 BPE (50257 tokens) but the model reads characters" in capsys.readouterr().err
    cfg = tiny_config(char_data, tmp_path / "finetune")
    cfg.init_from, cfg.preset, cfg.model = str(bpe_model), None, {}
    with pytest.raises(GPT2LabError, match="reads GPT-2 BPE .* but .* was prepared with characters"):
        train(cfg)
    # A character model saved without its tokenizer would read as GPT-2's: refused, with what to do.
    GPT.from_pretrained(char_run).save_pretrained(tmp_path / "bare")
    result = gpt2lab("generate", "--model", str(tmp_path / "bare"), "--prompt", "R")
    assert result.returncode == 2 and f"copy the {TOKENIZER_FILE}" in result.stderr


def test_damaged_tokenizer_files(char_data, tmp_path):
    for name in ("train.bin", "val.bin", "meta.json"):
        (tmp_path / name).write_bytes((char_data / name).read_bytes())
    with pytest.raises(GPT2LabError, match="meta.json says char with 38 tokens but the tokenizer beside it"):
        TokenData.open(tmp_path)  # the vocabulary is missing: GPT-2's would be read
    (tmp_path / TOKENIZER_FILE).write_text('{"format": "gpt2lab-tokenizer", "name": "char", "chars": "ba"}')
    with pytest.raises(GPT2LabError, match="is damaged: a character vocabulary must be .* sorted"):
        TokenData.open(tmp_path)
    save_tokenizer(CharTokenizer("ab"), tmp_path)
    with pytest.raises(GPT2LabError, match="but the tokenizer beside it has char with 2"):
        TokenData.open(tmp_path)


def test_prepare_refuses_an_unknown_tokenizer(tmp_path):
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(GPT2LabError, match="unknown tokenizer 'chars' \\(did you mean 'char'\\?\\)"):
        prepare(tmp_path / "t.txt", tmp_path / "out", tokenizer="chars")
    assert not (tmp_path / "out").exists()


def test_shakespeare_char_config_is_the_specified_model(tmp_path):
    from gpt2lab.train.config import load_config
    from gpt2lab.train.setup import build_model

    data = TokenData.open(prepare("shakespeare", tmp_path, tokenizer="char") and tmp_path)
    configs = Path(__file__).resolve().parents[2] / "configs"
    model = build_model(load_config(configs / "shakespeare-char.toml"), vocab_size=data.vocab_size)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (6, 6, 384, 256, 65)
    assert c.pos_encoding == "learned" and c.window is None and c.n_kv_head == 6  # GPT-2's block, no variant
    assert model.lm_head.weight is model.transformer.wte.weight
    cpu = build_model(load_config(configs / "shakespeare-char-cpu.toml"), vocab_size=data.vocab_size).config
    assert (cpu.block_size, cpu.vocab_size) == (256, 65) and cpu.n_embd < c.n_embd
