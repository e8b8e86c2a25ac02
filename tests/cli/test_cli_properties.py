"""Property: whatever values the CLI's options and a config's keys are given, the answer is success or one
`error:` line with status 2, never a traceback, and a refused command writes nothing. Hypothesis draws the
values (integers of any size, floats including NaN and infinities, odd text); the commands are the cheap ones
(argument and config checks, guards), so the search stays within seconds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab import GPT, GPTConfig
from gpt2lab.cli.main import main
from gpt2lab.errors import GPT2LabError
from gpt2lab.train.config import load_config

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["0", "-0", "1e400", "nan", "inf", "0x10", "", " ", "1_000", "٣"]),
)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)


def bounded(examples: int) -> settings:
    """Few examples per test (each runs a command): the whole file stays well under a minute on a quiet machine."""
    checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
    return settings(max_examples=examples, deadline=None, suppress_health_check=checks)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prop") / "model"
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)).save_pretrained(folder)
    return folder


def outcome(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        status = main(args)
    except SystemExit as e:  # argparse refuses at the door
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_clean(status: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert status in (0, 2), (status, err)
    if status == 2:
        lines = [line for line in err.splitlines() if line.strip() and not re.search(r"(doc|step|it)/s", line)]
        assert len(lines) == 1 and ("error:" in lines[0]), err


GENERATE_OPTIONS = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"]


@bounded(25)
@given(option=st.sampled_from(GENERATE_OPTIONS), value=NUMBERS)
def test_generate_options_answer_cleanly(model_dir, capsys, option, value):
    args = ["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "2", option, str(value)]
    status, _, err = outcome(args, capsys)
    assert_clean(status, err)


TRAIN_KEYS = [
    "lr", "min_lr", "seed", "max_iters", "batch_size", "block_size", "grad_accum", "warmup_iters", "lr_decay_iters",
    "weight_decay", "grad_clip", "dropout", "n_layer", "n_head", "n_embd", "eval_interval", "ckpt_interval",
    "layer_norm_epsilon", "window", "n_kv_head", "rope_theta", "dtype", "betas",
]  # fmt: skip


@bounded(150)
@given(key=st.sampled_from(TRAIN_KEYS), value=st.one_of(NUMBERS, TEXT, st.lists(NUMBERS, max_size=3)))
def test_config_values_are_accepted_or_refused_with_one_line(key, value):
    """Any `--set KEY=VALUE` builds a valid config or raises one GPT2LabError line, never another exception."""
    text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, float) else str(value)
    if isinstance(value, list):
        text = "[" + ", ".join(map(str, value)) + "]"
    try:
        cfg = load_config(None, [f"{key}={text}"])
    except GPT2LabError as err:
        assert "\n" not in str(err)
    else:
        cfg.validate()  # what load_config returns is valid


PREPARE_OPTIONS = ["--val-fraction", "--threads", "--shard-tokens", "--val-tokens"]


@bounded(20)
@given(option=st.sampled_from(PREPARE_OPTIONS), value=NUMBERS)
def test_prepare_options_refused_write_nothing(tmp_path, capsys, option, value):
    out = tmp_path / f"out-{abs(hash((option, str(value))))}"
    (tmp_path / "t.txt").write_text("hello world " * 30)
    status, _, err = outcome(["prepare", str(tmp_path / "t.txt"), "--out", str(out), option, str(value)], capsys)
    assert_clean(status, err)
    if status != 0:
        assert not out.exists()


EVAL_OPTIONS = ["--context", "--batch-size", "--max-tokens"]


@bounded(20)
@given(option=st.sampled_from(EVAL_OPTIONS), value=NUMBERS)
def test_eval_options_answer_cleanly(model_dir, tmp_path, capsys, option, value):
    text = tmp_path / "t.txt"
    text.write_text("Hello world, this is a test. " * 20)
    args = ["eval", "--model", str(model_dir), "--data", str(text), "--batch-size", "4", option, str(value)]
    status, _, err = outcome(args, capsys)
    assert_clean(status, err)
