"""Issue 23, items 5-7: numbers checked against what they cost (seeds, generation memory, NaN weights),
checkpoint folders closed (no pointer, shard index or link may lead outside), defaults that fit the input
(adaptive validation split, exports that carry the tokenizer, `demo --pretrained` with a bad path, sliding
generation for learned positions, eval --max-tokens below a window)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tf_checkpoint_writer import write_gpt2_checkpoint

from gpt2lab import GPT, GPTConfig
from gpt2lab.cli.main import main
from gpt2lab.data.shards import prepare_shards
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.generation import generate, stream_text
from gpt2lab.generation_limits import generation_bytes
from gpt2lab.tokenizer import load_tokenizer
from gpt2lab.train.config import TrainConfig


def one_line(args: list, capsys, named: str, status: int = 2) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == status, err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert named in err, err
    return err


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("m") / "model"
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50257)).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------- item 5: numbers


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(10**40)])
def test_seeds_beyond_the_rng_range_are_one_line(small_model, seed, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(small_model), "--prompt", "Hi", "--seed", seed])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "seed must be an integer in [0, 4294967295]" in err and "Traceback" not in err
    with pytest.raises(GPT2LabError, match="config: seed must be an integer"):
        TrainConfig(seed=int(seed)).validate()


def test_a_generation_that_would_need_terabytes_is_refused_before_allocating(tmp_path, capsys):
    """A RoPE model extrapolates, so only memory limits --max-new-tokens: the KV cache is sized first."""
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257, pos_encoding="rope")
    GPT(config).save_pretrained(tmp_path / "rope")
    n = 10**11
    need = generation_bytes(config, 1, 1 + n, 1 + n, 4)
    assert need == 2 * 2 * 1 * config.n_kv_head * config.head_dim * (1 + n) * 4 + 50257 * 4  # hand-computed
    err = one_line(
        ["generate", "--model", tmp_path / "rope", "--prompt", "Hi", "--max-new-tokens", n], capsys, "GiB for the KV"
    )
    assert f"{need / 2**30:,.1f} GiB" in err


def test_nan_weights_are_refused_at_load_with_the_tensor_name(small_model, tmp_path, capsys):
    """Issue: a model with NaN weights generated newlines and evaluated to `loss nan`, exit 0."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((small_model / "config.json").read_bytes())
    state = load_file(small_model / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"][3, 5] = float("nan")
    save_file(state, bad / "model.safetensors")
    one_line(["generate", "--model", bad, "--prompt", "Hi"], capsys, "tensor transformer.h.0.mlp.c_fc.weight holds 1")


@pytest.mark.parametrize("option", ["--temperature", "--top-p"])
def test_sampling_values_below_float32s_range_still_sample(small_model, option, capsys):
    """Found by the property test: such a value turned every score into NaN (a torch RuntimeError)."""
    args = ["generate", "--model", str(small_model), "--prompt", "Hi", "--max-new-tokens", "3", option, "2.2e-309"]
    assert main(args) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------- item 6: closed folders


def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(small_model, tmp_path):
    GPT.from_pretrained(small_model).export_hf(tmp_path / "outside")  # a real weight file, outside
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "config.json").write_bytes((tmp_path / "outside" / "config.json").read_bytes())
    index = {"weight_map": {"transformer.wte.weight": "../outside/model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(GPT2LabError, match="resolves outside its folder"):
        GPT.from_pretrained(folder)
    index["weight_map"]["transformer.wte.weight"] = str(tmp_path / "outside" / "model.safetensors")  # absolute
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(GPT2LabError, match="resolves outside its folder"):
        GPT.from_pretrained(folder)


def test_a_weight_file_linked_outside_the_folder_is_refused(small_model, tmp_path):
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "config.json").write_bytes((small_model / "config.json").read_bytes())
    os.symlink(small_model / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(GPT2LabError, match="resolves outside its folder"):
        GPT.from_pretrained(folder)


def test_a_tf_checkpoint_pointer_out_of_the_folder_is_not_followed(tmp_path):
    """The `checkpoint` file names `../elsewhere/model.ckpt`: that checkpoint is never read."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    elsewhere = tmp_path / "elsewhere"
    write_gpt2_checkpoint(GPT(config), elsewhere)
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "hparams.json").write_bytes((elsewhere / "hparams.json").read_bytes())
    (folder / "checkpoint").write_text('model_checkpoint_path: "../elsewhere/model.ckpt"\n')
    with pytest.raises(GPT2LabError, match="no TensorFlow checkpoint index"):
        GPT.from_pretrained(folder)
    assert GPT.from_pretrained(elsewhere).config.n_embd == 32  # the pointer's target is itself a sound checkpoint


# ---------------------------------------------------------------------------------------- item 7: defaults


def test_the_default_validation_split_fits_a_small_corpus(tmp_path):
    """Issue: the default --val-tokens (10 M) made `prepare corpus.jsonl` fail for any corpus under 10 M tokens,
    after writing a shard and a manifest, and then refused the retry."""
    rows = [json.dumps({"text": f"document number {i} says hello to the world"}) for i in range(200)]
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    meta = prepare_shards([tmp_path / "c.jsonl"], tmp_path / "out", workers=1)
    enc = load_tokenizer()
    doc_tokens = [len(enc.encode_ordinary(json.loads(r)["text"])) + 1 for r in rows]
    total = sum(doc_tokens)
    # the first documents up to the first document end at or past 10 % of the tokens
    ends = [sum(doc_tokens[: i + 1]) for i in range(len(doc_tokens))]
    expected_val = next(e for e in ends if e >= total // 10)
    assert (
        meta["tokens"] == total and meta["val_tokens"] == expected_val and meta["train_tokens"] == total - expected_val
    )
    data = TokenData.open(tmp_path / "out")
    assert enc.decode(np.asarray(data.val).tolist()).startswith("document number 0 ") and len(data.val) == expected_val
    assert not list((tmp_path / "out").glob("val_000000.bin"))  # the first val shard was replaced


def test_export_of_a_character_run_carries_its_tokenizer_and_generates(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("to be or not to be " * 200)
    prepare(tmp_path / "t.txt", tmp_path / "data", num_threads=1, tokenizer="char")
    sets = ["pos_encoding=learned", "window=full", "n_layer=1", "n_head=2", "n_embd=32", "model.block_size=16"]
    sets += ["block_size=16", "batch_size=2", "eval_iters=1", "max_iters=2", f"data.dir={tmp_path / 'data'}"]
    assert main(["train", *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "run")]) == 0
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert load_tokenizer(tmp_path / "hf").name == "char"
    capsys.readouterr()
    args = ["generate", "--model", tmp_path / "hf", "--prompt", "to be", "--max-new-tokens", "40", "--seed", "1"]
    assert main([str(a) for a in args]) == 0
    out, err = capsys.readouterr()
    # a 16-character context, 45 characters: the context slides, and says so once
    assert out.startswith("to be") and len(out.rstrip("\n")) == 45 and set(out) <= set("to ber n\n")
    assert err.count("slides it over the last 16 tokens") == 1


def test_sliding_generation_reads_the_last_block_size_tokens(small_model):
    """Each token past the context is the greedy choice of the model on the last block_size tokens."""
    model = GPT.from_pretrained(small_model).eval()
    tokenizer = load_tokenizer()
    prompt = "The quick brown fox"
    ids = tokenizer.encode(prompt)
    text = "".join(stream_text(model, tokenizer, prompt, 80, temperature=0))
    with pytest.raises(GPT2LabError, match="longer than the context"):  # the library call without slide refuses
        generate(model, torch.tensor([ids]), 80)
    # independent reference: a plain loop of full forwards over the last 64 tokens, argmax each time
    seq = list(ids)
    with torch.no_grad():
        for _ in range(80):
            seq.append(int(model(torch.tensor([seq[-64:]]))[0, -1].argmax()))
            if seq[-1] == tokenizer.eot_token:
                break
    expected = tokenizer.decode(seq[len(ids) :]).split("<|endoftext|>")[0]
    assert text == expected


def test_demo_pretrained_with_a_mistyped_path_fails(tmp_path, capsys, monkeypatch):
    """Issue: `demo --pretrained runs/mistyped` trained from scratch, exit 0. Nothing is prepared first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    one_line(["demo", "--pretrained", tmp_path / "runs" / "mistyped", "--out", tmp_path / "out"], capsys, "mistyped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_eval_max_tokens_below_one_window_is_refused(small_model, tmp_path, capsys):
    """Issue: `eval --max-tokens 1` evaluated 32 tokens."""
    (tmp_path / "t.txt").write_text("Hello world, this is a test. " * 40)
    one_line(
        ["eval", "--model", small_model, "--data", tmp_path / "t.txt", "--max-tokens", "1", "--context", "32"],
        capsys,
        "max_tokens 1 is less than one window of context 32",
    )


def test_val_tokens_larger_than_the_corpus_is_refused_with_nothing_kept(tmp_path, capsys):
    """Issue: prepare wrote a validation shard and a manifest before refusing, then refused the retry."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    args = ["prepare", tmp_path / "c.jsonl", "--out", tmp_path / "out", "--val-tokens", "1000", "--threads", "1"]
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and "all of them in the validation shard" in err and "nothing was kept" in err
    assert not (tmp_path / "out").exists()
    assert main([str(a) for a in args[:-4]] + ["--threads", "1"]) == 0  # the retry (default split) succeeds
