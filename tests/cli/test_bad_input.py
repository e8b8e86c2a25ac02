"""Every bad input on the command line ends in exit status 2 and one stderr line naming the problem: no
traceback, and nothing written, neither in the working folder nor in the inputs the command read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.cli.main import main
from gpt2lab.data.tokens import prepare


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Inputs the bad commands point at: a tiny model, prepared data (sound and damaged), odd files."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("tiny")).save_pretrained(root / "model")
    (root / "text.txt").write_text("To be, or not to be, that is the question. " * 200)
    prepare(root / "text.txt", root / "data", num_threads=1)
    shutil.copytree(root / "data", root / "bad-meta")
    (root / "bad-meta" / "meta.json").write_text('{"tokens": 12, ')
    shutil.copytree(root / "data", root / "odd-bin")
    with open(root / "odd-bin" / "train.bin", "ab") as f:
        f.write(b"\0")
    shutil.copytree(root / "model", root / "bad-config")
    config = json.loads((root / "bad-config" / "config.json").read_text())
    (root / "bad-config" / "config.json").write_text(json.dumps({**config, "n_layer": "two"}))
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("café, naïve".encode("latin-1"))
    (root / "a-file").write_text("not a folder")
    (root / "configs").mkdir()
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


M, D = "{inputs}/model", "{inputs}/data"
TRAIN = ["train", "--set", f"data.dir={D}", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2"]
CASES = {
    # generate: sampling values, devices, stop strings, models
    "temperature nan": (["generate", "--model", M, "--prompt", "Hi", "--temperature", "nan"], "temperature"),
    "temperature inf": (["generate", "--model", M, "--prompt", "Hi", "--temperature", "inf"], "temperature"),
    "temperature negative": (["generate", "--model", M, "--prompt", "Hi", "--temperature", "-1"], "temperature"),
    "top_p above 1": (["generate", "--model", M, "--prompt", "Hi", "--top-p", "1.5"], "top_p"),
    "top_k 0": (["generate", "--model", M, "--prompt", "Hi", "--top-k", "0"], "top_k"),
    "max tokens negative": (["generate", "--model", M, "--prompt", "Hi", "--max-new-tokens", "-1"], "max_new_tokens"),
    "device banana": (["generate", "--model", M, "--prompt", "Hi", "--device", "banana"], "banana"),
    "device cuda absent": (["generate", "--model", M, "--prompt", "Hi", "--device", "cuda:7"], "cuda"),
    "empty stop": (["generate", "--model", M, "--prompt", "Hi", "--stop", ""], "stop"),
    "unknown dtype": (["generate", "--model", M, "--prompt", "Hi", "--dtype", "float8"], "float8"),
    "mistyped local path": (["generate", "--model", "{inputs}/modle", "--prompt", "Hi"], "modle"),
    "config field of wrong type": (["generate", "--model", "{inputs}/bad-config", "--prompt", "Hi"], "n_layer"),
    "prompt beyond context": (["generate", "--model", M, "--prompt", "Hi " * 200], "context"),
    # train: values of the wrong type or range, files that are not configs, outputs that are files
    "lr not a number": ([*TRAIN, "--set", "lr=fast"], "lr"),
    "lr nan": ([*TRAIN, "--set", "lr=nan"], "lr"),
    "betas of one": ([*TRAIN, "--set", "betas=[0.9]"], "betas"),
    "seed fraction": ([*TRAIN, "--set", "seed=1.5"], "seed"),
    "grad_clip string": ([*TRAIN, "--set", "grad_clip=big"], "grad_clip"),
    "log_interval 0": ([*TRAIN, "--set", "log_interval=0"], "log_interval"),
    "eval_interval 0": ([*TRAIN, "--set", "eval_interval=0"], "eval_interval"),
    "weight_decay negative": ([*TRAIN, "--set", "weight_decay=-0.1"], "weight_decay"),
    "warmup negative": ([*TRAIN, "--set", "warmup_iters=-5"], "warmup_iters"),
    "lr_decay_iters 0": ([*TRAIN, "--set", "lr_decay_iters=0"], "lr_decay_iters"),
    "layer_norm_epsilon negative": ([*TRAIN, "--set", "layer_norm_epsilon=-1e-5"], "layer_norm_epsilon"),
    "n_layer 0": ([*TRAIN, "--set", "n_layer=0"], "n_layer"),
    "window list too short": ([*TRAIN, "--set", "n_layer=2", "--set", 'window=[8, "full", 8]'], "window"),
    "unknown key": ([*TRAIN, "--set", "learning_rate=1e-3"], "learning_rate"),
    "config is a folder": (["train", "--config", "{inputs}/configs"], "folder"),
    "config is binary": (["train", "--config", "{inputs}/binary.bin"], "binary.bin"),
    "config missing": (["train", "--config", "{inputs}/nope.toml"], "nope.toml"),
    "out is a file": ([*TRAIN, "--out", "{inputs}/a-file"], "a-file"),
    "malformed meta.json": ([*TRAIN[:2], "data.dir={inputs}/bad-meta", "--out", "run"], "meta.json"),
    "odd-length train.bin": ([*TRAIN[:2], "data.dir={inputs}/odd-bin", "--out", "run"], "train.bin"),
    # prepare
    "threads negative": (["prepare", "{inputs}/text.txt", "--out", "out", "--threads", "-3"], "threads"),
    "val fraction 0": (["prepare", "{inputs}/text.txt", "--out", "out", "--val-fraction", "0"], "val_fraction"),
    "binary source": (["prepare", "{inputs}/binary.bin", "--out", "out"], "binary.bin"),
    "non-UTF-8 source": (["prepare", "{inputs}/latin1.txt", "--out", "out"], "UTF-8"),
    "missing source": (["prepare", "{inputs}/nope.txt", "--out", "out"], "nope.txt"),
    "prepare out is a file": (["prepare", "{inputs}/text.txt", "--out", "{inputs}/a-file"], "a-file"),
    # eval, info, convert
    "eval context 0": (["eval", "--model", M, "--data", D, "--context", "0"], "context"),
    "eval max tokens 0": (["eval", "--model", M, "--data", D, "--max-tokens", "0"], "max_tokens"),
    "eval batch 0": (["eval", "--model", M, "--data", D, "--batch-size", "0"], "batch_size"),
    "eval missing data": (["eval", "--model", M, "--data", "{inputs}/nope"], "nope"),
    "info window 0": (["info", "--set", "window=0"], "window"),
    "info seq_len negative": (["info", "--seq-len", "-5"], "seq_len"),
    "info unknown preset": (["info", "--config", "gpt5"], "gpt5"),
    "convert heads not dividing": (["convert", "--model", M, "--n-kv-head", "3", "--out", "gqa"], "divide"),
    "convert heads 0": (["convert", "--model", M, "--n-kv-head", "0", "--out", "gqa"], "n_kv_head"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_exit_2_and_nothing_written(case, inputs, tmp_path, monkeypatch, capsys):
    args, named = CASES[case]
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    try:
        status = main([a.replace("{inputs}", str(inputs)) for a in args])
    except SystemExit as e:  # argparse refuses at the door
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error:") or ": error:" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert named.lower() in err.lower(), f"{named!r} not named in {err!r}"
    assert list(tmp_path.iterdir()) == [], "something was written"
    assert snapshot(inputs) == before, "an input was changed"


def test_stop_string_escapes_reach_the_generator(inputs, monkeypatch, capsys):
    """`--stop "\\n"` as a shell passes it (a backslash and an n) stops at a newline."""
    seen = {}

    def fake_stream_text(model, tokenizer, prompt, max_new_tokens, *, stop=None, **sampling):
        seen["stop"] = stop
        return iter(())

    monkeypatch.setattr("gpt2lab.cli.models.stream_text", fake_stream_text)
    args = ["generate", "--model", f"{inputs}/model", "--prompt", "Hi", "--stop", "\\n\\n", "--stop", "a\\tb\\\\n"]
    assert main(args) == 0
    assert seen["stop"] == ["\n\n", "a\tb\\n"]


def test_a_tiny_positive_temperature_is_greedy(inputs, capsys):
    """1e-38 is a valid temperature: logits divided by it overflow, yet the sampler picks the argmax."""
    common = ["generate", "--model", f"{inputs}/model", "--prompt", "To be", "--max-new-tokens", "8", "--seed", "1"]
    assert main([*common, "--temperature", "1e-38"]) == 0
    tiny = capsys.readouterr().out
    assert main([*common, "--temperature", "0"]) == 0
    assert tiny == capsys.readouterr().out
