"""Training: config parsing, schedule, optimizer groups, exact resume (also after SIGINT/SIGTERM and
kill -9), checkpoint integrity, fine-tuning and GQA uptraining, and the one-line errors."""

from __future__ import annotations

import json
import math
import re
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import logged_losses, start_training, tiny_args, tiny_config, wait_for_step

import gpt2lab.kernels.choice as kernel_choice
import gpt2lab.train.config
from gpt2lab.checkpoints.train_state import load_checkpoint, save_checkpoint
from gpt2lab.cli.main import main
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.train.config import TrainConfig, load_config
from gpt2lab.train.loop import train
from gpt2lab.train.setup import lr_at, make_optimizer, resolve_dtype

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ---------------------------------------------------------------------------------------- config


def test_demo_toml_is_the_defaults():
    """``gpt2lab demo`` trains with TrainConfig's defaults; configs/demo.toml must spell out the same."""
    assert load_config(CONFIGS / "demo.toml") == TrainConfig()


@pytest.mark.parametrize(
    "name", ["demo", "shakespeare", "shakespeare-char", "shakespeare-char-cpu", "gpt2-124m", "finetune"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert cfg.max_iters > 0


def test_overrides_and_sections(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npreset = "tiny"\npos_encoding = "rope"\n[optim]\nlr = 3e-4\n[batch]\nseq_len = 64\n')
    cfg = load_config(path, ["optim.lr=1e-3", "strategy=fsdp", "n_kv_head=2", "betas=[0.9, 0.99]", "compile=true"])
    assert cfg.model == {"pos_encoding": "rope", "n_kv_head": 2}  # a file's [model] replaces the default shape
    assert (cfg.lr, cfg.strategy, cfg.seq_len, cfg.betas, cfg.compile) == (1e-3, "fsdp", 64, [0.9, 0.99], True)
    assert load_config(None, ["model.block_size=512"]).model["block_size"] == 512
    assert load_config(None, ["data.dir=some/folder"]).data_dir == "some/folder"


def test_the_old_block_size_of_the_batch_is_read_as_seq_len(tmp_path, capsys, monkeypatch):
    """[batch] block_size was the training length before seq_len had its own name: a TOML file and --set
    that spell it so still work, with one note on stderr per source; model.block_size stays the model's."""
    monkeypatch.setattr(gpt2lab.train.config, "_noted", set())  # once per source and process: start afresh
    path = tmp_path / "old.toml"
    path.write_text('[model]\npreset = "tiny"\nblock_size = 256\n[batch]\nblock_size = 64\n')
    cfg = load_config(path)
    assert (cfg.seq_len, cfg.model["block_size"]) == (64, 256)
    assert capsys.readouterr().err == f"note: {path}: [batch] block_size is now called seq_len; read as seq_len\n"
    assert load_config(None, ["block_size=48"]).seq_len == 48  # bare: the batch's, as it always was
    assert load_config(None, ["batch.block_size=40"]).seq_len == 40
    assert "note: --set: [batch] block_size is now called seq_len" in capsys.readouterr().err
    assert load_config(None, ["model.block_size=512"]).model["block_size"] == 512


def test_a_run_saved_with_the_old_block_size_resumes_and_is_still_checked(corpus, tmp_path):
    """A checkpoint written before the renaming holds train_config["block_size"]: resuming it with the same
    length works, and a different seq_len is still refused (the old key is compared, not ignored)."""
    train(tiny_config(corpus, tmp_path, "max_iters=1"))
    state = load_checkpoint(tmp_path / "ckpt.pt")
    state["train_config"]["block_size"] = state["train_config"].pop("seq_len")
    save_checkpoint(tmp_path / "ckpt.pt", state)
    with pytest.raises(GPT2LabError, match="seq_len 16 -> 8"):
        train(tiny_config(corpus, tmp_path, "max_iters=2", "seq_len=8"), resume=True)
    assert train(tiny_config(corpus, tmp_path, "max_iters=2"), resume=True)["step"] == 2


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("[optim]\nlearning_rate = 1\n", [], "unknown key 'learning_rate' in [optim]"),
        ("[optim]\nbatch_sise = 1\n", [], "unknown key 'batch_sise' in [optim] (did you mean 'batch_size'?)"),
        ("[optim]\nbatch_size = 1\n", [], "'batch_size' belongs in [batch], not [optim]"),
        ("[optimizer]\nlr = 1\n", [], "unknown section [optimizer] (did you mean 'optim'?)"),
        ("", ["wieght_decay=0.1"], "did you mean 'weight_decay'"),
        ("", ["strategy=zero"], "strategy must be one of"),
        ("", ["max_iters=0"], "max_iters must be a positive integer"),
        ("", ["lr"], "--set expects key=value"),
    ],
)
def test_config_errors(tmp_path, text, overrides, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(GPT2LabError, match=re.escape(message)):
        load_config(path, overrides)


def test_cli_config_error_is_one_line(tmp_path, capsys):
    assert main(["train", "--set", "n_layers=2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'n_layer'" in err


# ---------------------------------------------------------------------------------------- schedule, optimizer


def test_lr_schedule_warmup_cosine_floor():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg) == lr_at(500, cfg) == 0.1
    lrs = [lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_weight_decay_on_matrices_only():
    model = GPT(GPTConfig.from_preset("tiny"))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------- a run and its outputs


def test_run_outputs_and_learning(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(tiny_config(corpus, out, "max_iters=30", "eval_interval=15", "warmup_iters=5"))
    losses = logged_losses(out)
    assert list(losses) == list(range(1, 31))
    assert np.mean([losses[i] for i in range(26, 31)]) < losses[1] - 1.0  # it learns
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    for name in ("ckpt.pt", "loss.png", "model.safetensors", "config.json", "train_config.json"):
        assert (out / name).is_file(), name
    # The exported model is the trained one (without its padded vocabulary), and the CLI generates from the run folder.
    model = GPT.from_pretrained(out)
    trained = load_checkpoint(out / "ckpt.pt")["model"]["lm_head.weight"]
    assert torch.equal(model.lm_head.weight, trained[: model.config.vocab_size])
    assert main(["generate", "--model", str(out), "--prompt", "The", "--max-new-tokens", "3", "--seed", "0"]) == 0


def test_variants_from_scratch(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path, "max_iters=2", "pos_encoding='rope'", "n_kv_head=1", "window=8")
    summary = train(cfg)
    config = GPT.from_pretrained(tmp_path).config
    assert (config.pos_encoding, config.n_kv_head, config.window) == ("rope", 1, 8)
    assert math.isfinite(summary["val_loss"])


def test_bfloat16_autocast_runs(corpus, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "bfloat16 autocast on this cpu")  # an AVX2 CI machine
        summary = train(tiny_config(corpus, tmp_path, "max_iters=1", "dtype='bfloat16'"))
    assert math.isfinite(summary["losses"][0][1])


@pytest.mark.parametrize("native", [True, False])
def test_slow_bfloat16_warns(native, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert [str(w.message).split(" has ")[0] for w in caught] == ([] if native else ["bfloat16 autocast on this cpu"])


@pytest.mark.parametrize("faster", ["fp32", "bf16_autocast"])
def test_dtype_auto_picks_the_faster_by_measurement(faster, monkeypatch):
    """``auto`` runs both candidates once and takes the one with the smaller time (here a fake clock makes
    ``faster`` win); the choice is cached; GPT2LAB_KERNEL pins it without measuring."""
    monkeypatch.delenv(kernel_choice.ENV, raising=False)
    kernel_choice.forget()
    ran = []
    real_measure = kernel_choice.measure

    def fake_measure(candidates):
        real = real_measure(candidates)  # both really run: bf16 autocast must work here
        ran.append(sorted(real))
        return {name: 1.0 if name == faster else 2.0 for name in real}

    monkeypatch.setattr(kernel_choice, "measure", fake_measure)
    cpu = torch.device("cpu")
    expected = torch.float32 if faster == "fp32" else torch.bfloat16
    assert resolve_dtype("auto", cpu) == expected and resolve_dtype("auto", cpu) == expected
    assert ran == [["bf16_autocast", "fp32"]]
    other = "bf16_autocast" if faster == "fp32" else "fp32"
    monkeypatch.setenv(kernel_choice.ENV, other)
    kernel_choice.forget()
    assert resolve_dtype("auto", cpu) != expected and len(ran) == 1
    kernel_choice.forget()


def test_finetune_and_gqa_uptraining(corpus, tmp_path):
    base = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=32))
    base.save_pretrained(tmp_path / "base")
    cfg = tiny_config(corpus, tmp_path / "ft", "max_iters=1", "lr=1e-9", "min_lr=1e-9")
    cfg.init_from, cfg.preset, cfg.model = str(tmp_path / "base"), None, {}
    train(cfg)
    tuned = GPT.from_pretrained(tmp_path / "ft")
    assert (tuned.transformer.wte.weight - base.transformer.wte.weight).abs().max() < 1e-6  # started from base
    cfg.out_dir, cfg.convert_n_kv_head = str(tmp_path / "gqa"), 2
    train(cfg)
    assert GPT.from_pretrained(tmp_path / "gqa").config.n_kv_head == 2


# ---------------------------------------------------------------------------------------- exact resume


def test_resume_is_exact(corpus, tmp_path):
    straight = train(tiny_config(corpus, tmp_path / "a", "max_iters=6"))
    train(tiny_config(corpus, tmp_path / "b", "max_iters=3"))
    resumed = train(tiny_config(corpus, tmp_path / "b", "max_iters=6"), resume=True)
    assert resumed["losses"] == straight["losses"][3:]  # bit-exact on CPU
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")
    a, b = (load_checkpoint(tmp_path / d / "ckpt.pt")["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _check_continues_exactly(corpus, tmp_path, out: Path, checkpoint_step: int) -> None:
    """Resuming ``out`` for 3 steps reproduces an uninterrupted run step for step."""
    end = checkpoint_step + 3
    with torch.random.fork_rng():
        torch.set_num_threads(1)  # the interrupted run used one thread (OMP_NUM_THREADS=1)
        reference = logged_losses(Path(train(tiny_config(corpus, tmp_path / "ref", f"max_iters={end}"))["out_dir"]))
        train(tiny_config(corpus, out, f"max_iters={end}"), resume=True)
    assert logged_losses(out) == reference


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_and_resumes_exactly(corpus, tmp_path, signum):
    out = tmp_path / "run"
    proc = start_training(corpus, out)
    wait_for_step(proc, out, 3)
    proc.send_signal(signum)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert step >= 3 and f"stopped at step {step}" in stdout
    assert max(logged_losses(out)) == step  # the checkpoint holds the last logged step
    _check_continues_exactly(corpus, tmp_path, out, step)


def test_kill_9_loses_only_work_since_last_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start_training(corpus, out, "ckpt_interval=4")
    wait_for_step(proc, out, 9)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=30)
    step = load_checkpoint(out / "ckpt.pt")["step"]  # verified: a kill mid-write leaves the previous file whole
    assert step % 4 == 0 and step >= 8
    _check_continues_exactly(corpus, tmp_path, out, step)


# ---------------------------------------------------------------------------------------- errors


def test_corrupted_checkpoint_is_detected_not_loaded(corpus, tmp_path, capsys):
    train(tiny_config(corpus, tmp_path, "max_iters=1"))
    ckpt = tmp_path / "ckpt.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(GPT2LabError, match="corrupted .checksum mismatch.; it was not loaded"):
        train(tiny_config(corpus, tmp_path, "max_iters=2"), resume=True)
    ckpt.write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", *tiny_args(corpus, tmp_path, "max_iters=2")]) == 2
    assert "not a gpt2lab training checkpoint" in capsys.readouterr().err


def test_resume_errors(corpus, tmp_path):
    with pytest.raises(GPT2LabError, match="nothing to resume"):
        train(tiny_config(corpus, tmp_path, "max_iters=1"), resume=True)
    train(tiny_config(corpus, tmp_path, "max_iters=1"))
    with pytest.raises(GPT2LabError, match=r"different model \(n_layer: 1 vs 2"):
        train(tiny_config(corpus, tmp_path, "max_iters=2", "n_layer=2"), resume=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["seq_len=64"], r"seq_len \(64\) is longer than the model's context \(block_size 32\)"),
        (["grad_accum=3"], None),  # fine in one process; only a multiple of the world size is required
    ],
)
def test_batch_must_fit_the_model(corpus, tmp_path, overrides, message):
    cfg = tiny_config(corpus, tmp_path, "max_iters=1", *overrides)
    if message is None:
        train(cfg)
    else:
        with pytest.raises(GPT2LabError, match=message):
            train(cfg)


def test_data_errors(corpus, tmp_path):
    with pytest.raises(GPT2LabError, match="no prepared data"):
        train(tiny_config(tmp_path / "nowhere", tmp_path / "run", "max_iters=1"))
    short = tmp_path / "short"
    short.mkdir()
    for name in ("train.bin", "meta.json"):
        (short / name).write_bytes((corpus / name).read_bytes())
    np.arange(10, dtype=np.uint16).tofile(short / "val.bin")
    with pytest.raises(GPT2LabError, match="the val split .* has 10 tokens, fewer than one sequence"):
        train(tiny_config(short, tmp_path / "run", "max_iters=1"))


def test_compiled_training_matches_eager_and_resumes(corpus, tmp_path):
    """``compile = true``: the same losses as eager (to compiler rounding), and a compiled run's
    checkpoint resumes (state dicts come from the bare model, not the compiled wrapper)."""
    eager = train(tiny_config(corpus, tmp_path / "eager", "max_iters=4"))
    train(tiny_config(corpus, tmp_path / "compiled", "max_iters=2", "compile=true"))
    resumed = train(tiny_config(corpus, tmp_path / "compiled", "max_iters=4", "compile=true"), resume=True)
    assert [step for step, _ in resumed["losses"]] == [3, 4]
    assert [loss for _, loss in resumed["losses"]] == pytest.approx([loss for _, loss in eager["losses"][2:]], abs=1e-4)
    assert logged_losses(tmp_path / "compiled").keys() == logged_losses(tmp_path / "eager").keys()


def test_per_layer_window_list_in_toml_trains_and_loads(corpus, tmp_path):
    """TOML has no null: a global layer is "full", in a file and in --set alike."""
    path = tmp_path / "c.toml"
    path.write_text('[model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\nwindow = [8, "full"]\n')
    run = tmp_path / "run"
    overrides = ["seq_len=16", "batch_size=2", "eval_iters=1", "max_iters=2", "dtype='float32'"]
    cfg = load_config(path, [*overrides, f"data.dir='{corpus}'", f"out_dir='{run}'"])
    assert cfg.model["window"] == [8, "full"]
    assert load_config(None, ["n_layer=2", 'window=[8, "full"]']).model["window"] == [8, "full"]
    train(cfg)
    assert GPT.from_pretrained(run).config.window == [8, None]
    assert load_checkpoint(run / "ckpt.pt")["model_config"]["window"] == [8, None]
    train(load_config(path, [*overrides, "max_iters=3", f"data.dir='{corpus}'", f"out_dir='{run}'"]), resume=True)
    assert max(logged_losses(run)) == 3
