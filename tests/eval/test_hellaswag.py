"""HellaSwag scoring against a brute-force reference: each ending scored alone with a plain forward and
log-softmax, the answers of a small file in HellaSwag's format set from that reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_helpers import tiny_config

from gpt2lab.cli.main import main
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval.hellaswag import accuracies, evaluate_hellaswag, load_examples
from gpt2lab.model import GPT
from gpt2lab.tokenizer import load_tokenizer
from gpt2lab.train.loop import train
from gpt2lab.train.run import read_metrics

ITEMS = [
    ("A man is sitting on a roof. He", ["starts pulling up roofing on a roof.", "is using wrap to wrap a pair of skis.",
     "is ripping level tiles off.", "is holding a rubik's cube."]),
    ("The woman pours water into a glass and", ["drinks it slowly.", "sings.", "throws the glass at the moon, laughing",
     "puts it down"]),
    ("Two dogs run across the park", ["chasing a ball.", "and", "while the owner watches them from a bench nearby.",
     "."]),
    ("A chef slices onions", ["quickly with a sharp knife.", "then cries.", "for the soup", "on the cutting board."]),
    ("Kids play in the snow. They", ["build a snowman.", "go inside", "throw snowballs at each other all afternoon.",
     "sleep."]),
]  # fmt: skip


def _model() -> GPT:
    torch.manual_seed(3)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def _reference_choices(model: GPT, ctx: str, endings: list[str]) -> tuple[int, int]:
    """(lowest summed, lowest mean) loss of the ending's tokens, each ending run alone, no padding."""
    enc = load_tokenizer()
    context = enc.encode_ordinary(ctx)
    sums, means = [], []
    for ending in endings:
        tail = enc.encode_ordinary(" " + ending)
        row = torch.tensor([context + tail])
        with torch.no_grad():
            logp = torch.log_softmax(model(row[:, :-1])[0].double(), dim=-1)
        nll = [-logp[len(context) + j - 1, tail[j]].item() for j in range(len(tail))]
        sums.append(sum(nll))
        means.append(sum(nll) / len(nll))
    return min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__)


def _write(path, labels):
    lines = [json.dumps({"ind": i, "ctx": c, "endings": e, "label": lab, "split": "val"}) for i, ((c, e), lab) in
             enumerate(zip(ITEMS, labels, strict=True))]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def test_scores_match_brute_force(tmp_path):
    model = _model()
    reference = [_reference_choices(model, c, e) for c, e in ITEMS]
    # answers: the reference's mean-loss pick for the first three examples, a different ending for the rest
    labels = [ref[1] if i < 3 else (ref[1] + 1) % 4 for i, ref in enumerate(reference)]
    _write(tmp_path / "hs.jsonl", labels)
    counts = evaluate_hellaswag(model, load_examples(tmp_path / "hs.jsonl"), model.config.block_size)
    assert counts["correct_norm"] == 3
    assert counts["correct"] == sum(ref[0] == lab for ref, lab in zip(reference, labels, strict=True))
    assert accuracies(counts)["hellaswag_acc_norm"] == pytest.approx(0.6)
    # two ranks split the examples and together count the same
    shares = [evaluate_hellaswag(model, load_examples(tmp_path / "hs.jsonl"), 64, rank=r, world=2) for r in (0, 1)]
    assert sum(s["examples"] for s in shares) == 5 and sum(s["correct_norm"] for s in shares) == 3


def test_rows_longer_than_the_context_keep_the_ending(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()
    _write(tmp_path / "hs.jsonl", [0] * 5)
    counts = evaluate_hellaswag(model, load_examples(tmp_path / "hs.jsonl"), 16)
    assert counts["examples"] == 5


def test_eval_cli(tmp_path, capsys):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    labels = [_reference_choices(model, c, e)[1] for c, e in ITEMS]
    _write(tmp_path / "hs.jsonl", labels)
    assert main(["eval", "--model", str(tmp_path / "m"), "--hellaswag", str(tmp_path / "hs.jsonl")]) == 0
    assert "acc_norm 1.0000" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "m"), "--hellaswag", str(tmp_path / "missing.jsonl")]) == 2
    assert "no HellaSwag file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "line 1: not JSON"), ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "label indexing"),
     ('{"ctx": 1, "endings": ["b"], "label": 0}', "'ctx' must be a string")],
)  # fmt: skip
def test_bad_files_are_one_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(GPT2LabError, match=message):
        load_examples(tmp_path / "bad.jsonl")


def test_a_model_with_another_tokenizer_is_refused(tmp_path):
    _write(tmp_path / "hs.jsonl", [0] * 5)
    with pytest.raises(GPT2LabError, match="GPT-2 tokenizer .50257 tokens.; this model has 65"):
        load_examples(tmp_path / "hs.jsonl", vocab_size=65)


def test_training_logs_hellaswag(corpus, tmp_path):
    _write(tmp_path / "hs.jsonl", [0, 1, 2, 3, 0])
    cfg = tiny_config(
        corpus, tmp_path / "run", "max_iters=3", "hellaswag_interval=2", f"hellaswag_file='{tmp_path}/hs.jsonl'"
    )
    summary = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in rows] == [2, 3]
    final = GPT.from_pretrained(tmp_path / "run").eval()
    expected = evaluate_hellaswag(final, load_examples(tmp_path / "hs.jsonl"), final.config.block_size)
    assert math.isclose(rows[-1]["hellaswag_acc_norm"], expected["correct_norm"] / 5)
    assert summary["hellaswag_acc_norm"] == rows[-1]["hellaswag_acc_norm"]


def test_reference_printed_beside_val_loss(corpus, tmp_path, capsys):
    ref = ["reference={name='pub', source='a paper', points=[[64, 9.5], [1000, 3.0]]}"]
    cfg = tiny_config(corpus, tmp_path / "run", "max_iters=4", "eval_interval=2", *ref)
    assert cfg.reference_at(64) == (64, 9.5) and cfg.reference_at(65) == (1000, 3.0)
    assert cfg.reference_at(10**6) == (1000, 3.0)
    train(cfg)
    out = capsys.readouterr().out
    # 2 x 2 x 16 = 64 tokens per step: step 2 has seen 128 tokens, so the next point is the 1000-token one
    assert "val" in out and "(reference pub: val 3.00 at 1,000 tokens)" in out
    with pytest.raises(GPT2LabError, match="in order of tokens"):
        tiny_config(corpus, tmp_path / "r2", "reference={name='a', source='b', points=[[5, 1.0], [2, 1.0]]}")
