"""prepare: documents → token files with <|endoftext|> separators, the tail split, byte counts, the
named datasets (embedded pydoc; Tiny Shakespeare shipped with the package), and the data errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.cli.main import main
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import load_tokenizer

TEXTS = {"a.txt": "Hello world.\nSecond line.\n", "b.txt": "Ünïcode — and more text " * 20, "c.md": "# Title\n"}


def _write(folder: Path) -> Path:
    folder.mkdir()
    for name, text in TEXTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    return folder


def test_folder_of_documents(tmp_path):
    src = _write(tmp_path / "src")
    with pytest.raises(GPT2LabError, match="holds files prepare cannot read: ignored.bin"):
        prepare(src, tmp_path / "out", val_fraction=0.25)  # never skipped silently (issue 23)
    assert not (tmp_path / "out").exists()
    (src / "ignored.bin").unlink()
    meta = prepare(src, tmp_path / "out", val_fraction=0.25)
    enc = load_tokenizer()
    tokens = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    expected = "".join(text + "<|endoftext|>" for _, text in sorted(TEXTS.items()))
    assert enc.decode(tokens.tolist()) == expected  # each file is a document ending with <|endoftext|>
    assert meta["documents"] == 3 and int((tokens == enc.eot_token).sum()) == 3
    assert meta["train_tokens"] + meta["val_tokens"] == meta["tokens"] == len(tokens)
    assert meta["val_tokens"] == round(0.25 * len(tokens))  # the tail of the stream
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(t.encode()) for t in TEXTS.values())
    assert (meta["tokenizer"], meta["vocab_size"], meta["val_fraction"]) == ("gpt2", 50257, 0.25)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert not (tmp_path / "out" / "tokens.tmp").exists()


def test_embedded_pydoc_corpus(corpus):
    from pydoc_data.topics import topics

    d = TokenData.open(corpus)
    assert d.meta["documents"] == len(topics) and d.meta["tokens"] > 100_000
    assert len(d.train) == d.meta["train_tokens"] and len(d.val) == d.meta["val_tokens"]


def test_shakespeare_ships_with_the_package(tmp_path, shared_data, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("prepare shakespeare must not reach the network")

    monkeypatch.setattr("socket.socket.connect", no_network)
    meta = prepare("shakespeare", tmp_path, tokenizer="char")
    tokens = np.concatenate([np.fromfile(tmp_path / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    reference = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    assert hashlib.md5(reference.encode()).hexdigest() == "6fb458f1232090904fb40fe944165e91"
    assert load_tokenizer(tmp_path).decode(tokens.tolist()) == reference
    assert (meta["documents"], meta["vocab_size"], meta["tokens"]) == (1, 65, 1_115_394)


def test_cli_prepare(tmp_path, capsys):
    assert main(["prepare", str(_write(tmp_path / "src") / "a.txt"), "--out", str(tmp_path / "out")]) == 0
    assert "1 documents" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: str(p / "missing.txt"), "no such file, folder or dataset"),
        (lambda p: "pydco", "did you mean 'pydoc'"),
        (lambda p: (p / "e.txt").write_text(" \n") and str(p / "e.txt"), "every document is empty"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no text files"),
    ],
)
def test_prepare_errors(tmp_path, make, message):
    with pytest.raises(GPT2LabError, match=message):
        prepare(make(tmp_path), tmp_path / "out")


def _copy(corpus, tmp_path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (out / name).write_bytes((corpus / name).read_bytes())
    return out


def test_foreign_tokenizer_is_rejected(corpus, tmp_path):
    d = _copy(corpus, tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "tokenizer": "cl100k_base"}))
    with pytest.raises(GPT2LabError, match="made with tokenizer 'cl100k_base', not one of gpt2, char"):
        TokenData.open(d)
    (d / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100277}))
    with pytest.raises(GPT2LabError, match="vocabulary of 100277 tokens but the model has 50257"):
        TokenData.open(d, vocab_size=50257)
    (d / "meta.json").write_text(json.dumps(meta))
    np.array([1, 2, 60000, 3], dtype=np.uint16).tofile(d / "val.bin")
    with pytest.raises(GPT2LabError, match="token id 60000 >= vocab size 50257"):
        TokenData.open(d)


def test_missing_or_empty_splits(corpus, tmp_path):
    with pytest.raises(GPT2LabError, match="no prepared data"):
        TokenData.open(tmp_path)
    d = _copy(corpus, tmp_path)
    (d / "train.bin").write_bytes(b"")
    with pytest.raises(GPT2LabError, match="train.bin is missing or empty"):
        TokenData.open(d)


def test_an_output_folder_named_like_the_dataset_does_not_shadow_it(tmp_path, monkeypatch):
    """`prepare pydoc --out pydoc`: the folder prepare creates must not be read as the source."""
    monkeypatch.chdir(tmp_path)
    meta = prepare("pydoc", "pydoc", num_threads=1)
    assert meta["documents"] > 50 and (tmp_path / "pydoc" / "train.bin").is_file()
