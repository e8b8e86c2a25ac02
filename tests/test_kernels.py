"""Kernel choice as a user sees it (`gpt2lab info --kernels`) and int8 weights."""

import json

import pytest

import gpt2lab.kernel_choice as kernel_choice
from gpt2lab.cli import main


@pytest.fixture(autouse=True)
def fresh_kernel_choices(monkeypatch):
    monkeypatch.delenv(kernel_choice.ENV, raising=False)
    kernel_choice.forget()
    yield
    kernel_choice.forget()


def test_info_kernels_lists_every_choice_with_the_times_that_decided_it(capsys, monkeypatch):
    """Each product shape of the tiny model's decode (prompt rows and 1-row steps, fp32 and bf16) and the
    training dtype appear once, the picked candidate being the fastest measured; a pin shows as pinned."""
    assert main(["info", "--config", "tiny", "--kernels", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    choices = report["choices"]
    assert report["cpu"]["model"] and report["threads"] >= 1
    shapes = {(c["operation"], c["shape"]) for c in choices}
    # per dtype: 4 block shapes for the 8-token prompt and for 1-token steps, the head for the last row only
    assert len(shapes) == len(choices) == 2 * (4 + 4 + 1) + 1  # + the training dtype probe
    assert ("linear fp32", "<=1 rows, 64->192 +bias") in shapes and ("linear bf16", "<=8 rows, 256->64 +bias") in shapes
    for c in choices:
        assert c["how"] == "measured" and c["picked"] == min(c["seconds"], key=c["seconds"].get)
    assert {"fp32", "bf16_autocast"} == set(choices[-1]["seconds"])

    monkeypatch.setenv(kernel_choice.ENV, "linear,fp32")
    kernel_choice.forget()
    assert main(["info", "--config", "tiny", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "GPT2LAB_KERNEL=linear,fp32" in out and "measured" not in out
    assert out.count(" pinned ") == len(choices)
