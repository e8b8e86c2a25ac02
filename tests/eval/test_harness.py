"""lm-evaluation-harness on a gpt2lab model: the scores the harness publishes for three local tasks
(tests/harness_task: a perplexity task like wikitext, a continuation task like lambada_openai, and a
generation task) equal what a plain forward pass and cross-entropy give on the same text, and equal the
scores of the harness's own ``hf`` model (transformers) given the same weights."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPT2LabError, GPTConfig, load_tokenizer
from gpt2lab.cli.main import main
from gpt2lab.tokenizer import bpe_files

TASKS = Path(__file__).parent / "harness_task"
DOCS = [json.loads(line) for line in (TASKS / "docs.jsonl").read_text(encoding="utf-8").splitlines()]
BLOCK = 32  # short, so long documents need several rolling windows and long contexts are truncated
MAX_GEN = 6  # gpt2lab_generate.yaml's max_gen_toks
TOK = load_tokenizer()
EOT = TOK.eot_token
TASK_NAMES = ["gpt2lab_rolling", "gpt2lab_continuation", "gpt2lab_generate"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=50257)).eval()


@pytest.fixture(scope="module")
def harness(model):
    from gpt2lab.eval.harness import run_harness

    return run_harness(model, TASK_NAMES, include_path=[str(TASKS)], batch_size=3, log_samples=True)


def responses(results, task):
    """The model's answer to each document, in the order of docs.jsonl."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


@torch.no_grad()
def token_losses(model, inputs: list[int], targets: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([inputs]))[0]  # (T, vocab)
    return F.cross_entropy(logits.float(), torch.tensor(targets), reduction="none")


def rolling_reference(model, text: str) -> float:
    """log p(text | <|endoftext|>): targets in chunks of BLOCK, each scored once; the last chunk is predicted
    from the BLOCK tokens before its end, so it keeps a full context."""
    seq = [EOT, *TOK.encode(text)]
    n, total = len(seq) - 1, 0.0
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        first = max(0, stop - BLOCK)
        total += float(token_losses(model, seq[first:stop], seq[first + 1 : stop + 1])[start - first :].sum())
    return -total


@torch.no_grad()
def continuation_reference(model, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = TOK.encode(context), TOK.encode(continuation)
    inputs = (ctx + cont)[-(BLOCK + 1) : -1]
    logits = model(torch.tensor([inputs]))[0, -len(cont) :]
    nll = F.cross_entropy(logits, torch.tensor(cont), reduction="sum")
    return -float(nll), logits.argmax(dim=-1).tolist() == cont


@torch.no_grad()
def greedy_reference(model, context: str) -> str:
    ids = TOK.encode(context)[-(BLOCK - MAX_GEN) :]
    new = []
    for _ in range(MAX_GEN):
        token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
        if token == EOT:
            break
        new.append(token)
    return TOK.decode(new).split("\n", 1)[0]


def test_rolling_loglikelihood_is_the_models_own_loss(model, harness):
    texts = [d["context"] + d["continuation"] for d in DOCS]
    assert max(len(TOK.encode(t)) for t in texts) > 2 * BLOCK  # several windows are exercised
    reference = [rolling_reference(model, t) for t in texts]
    assert responses(harness, "gpt2lab_rolling") == pytest.approx(reference, rel=1e-5)

    scores = harness["results"]["gpt2lab_rolling"]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(re.split(r"\s+", t)) for t in texts)
    assert scores["bits_per_byte,none"] == pytest.approx(-sum(reference) / math.log(2) / n_bytes, rel=1e-5)
    assert scores["byte_perplexity,none"] == pytest.approx(math.exp(-sum(reference) / n_bytes), rel=1e-5)
    assert scores["word_perplexity,none"] == pytest.approx(math.exp(-sum(reference) / n_words), rel=1e-5)


def test_continuation_loglikelihood_and_greedy_match(model, harness):
    reference = [continuation_reference(model, d["context"], d["continuation"]) for d in DOCS]
    got = responses(harness, "gpt2lab_continuation")
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in reference], rel=1e-5)
    assert [g for _, g in got] == [g for _, g in reference]
    greedy = [g for _, g in reference]
    assert any(greedy) and not all(greedy)  # so acc below is neither trivially 0 nor 1

    scores = harness["results"]["gpt2lab_continuation"]
    mean_ll = sum(ll for ll, _ in reference) / len(reference)
    assert scores["perplexity,none"] == pytest.approx(math.exp(-mean_ll), rel=1e-5)
    assert scores["acc,none"] == pytest.approx(sum(greedy) / len(greedy))


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(model, harness):
    reference = [greedy_reference(model, d["context"]) for d in DOCS]
    assert responses(harness, "gpt2lab_generate") == reference
    exact = sum(r == d["continuation"] for r, d in zip(reference, DOCS, strict=True)) / len(DOCS)
    assert harness["results"]["gpt2lab_generate"]["exact_match,none"] == exact


def test_scores_equal_the_harness_own_hf_model_with_the_same_weights(model, harness, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import GPT2TokenizerFast

    model.export_hf(tmp_path)  # the same weights in the hub layout, with GPT-2's tokenizer files beside them
    vocab_bpe, encoder_json = bpe_files()
    GPT2TokenizerFast(vocab=encoder_json, merges=vocab_bpe).save_pretrained(tmp_path)
    reference = simple_evaluate(
        model=HFLM(pretrained=str(tmp_path), batch_size=3, device="cpu"),
        tasks=TASK_NAMES,
        task_manager=TaskManager(include_path=[str(TASKS)], include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    assert responses(harness, "gpt2lab_rolling") == pytest.approx(responses(reference, "gpt2lab_rolling"), rel=1e-5)
    ours, theirs = responses(harness, "gpt2lab_continuation"), responses(reference, "gpt2lab_continuation")
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=1e-5)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert responses(harness, "gpt2lab_generate") == responses(reference, "gpt2lab_generate")
    for task in TASK_NAMES:
        scores = {k: v for k, v in reference["results"][task].items() if isinstance(v, float) and "stderr" not in k}
        assert scores and {k: harness["results"][task][k] for k in scores} == pytest.approx(scores, rel=1e-5)


def test_cli_writes_the_scores_of_a_saved_model(model, harness, tmp_path, capsys):
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "scores.json"
    args = ["harness", "--model", str(tmp_path / "m"), "--tasks", "gpt2lab_continuation,gpt2lab_rolling"]
    options = ["--include-path", str(TASKS), "--limit", "4", "--bootstrap-iters", "10", "--output", str(out)]
    assert main([*args, *options]) == 0
    assert "gpt2lab_continuation" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    ll = [ll for ll, _ in responses(harness, "gpt2lab_continuation")[:4]]
    assert saved["results"]["gpt2lab_continuation"]["perplexity,none"] == pytest.approx(
        math.exp(-sum(ll) / 4), rel=1e-5
    )
    assert saved["n-samples"]["gpt2lab_rolling"]["effective"] == 4
    greedy = [g for _, g in responses(harness, "gpt2lab_continuation")[:4]]
    spread = math.sqrt(sum((g - sum(greedy) / 4) ** 2 for g in greedy) / 3 / 4)  # standard error of the mean
    assert saved["results"]["gpt2lab_continuation"]["acc_stderr,none"] == pytest.approx(spread)


def test_lm_eval_finds_the_model_class_by_name(model, tmp_path):
    from lm_eval.api.registry import get_model

    from gpt2lab.eval.harness import GPT2LabLM

    model.save_pretrained(tmp_path)
    lm = get_model("gpt2lab").create_from_arg_string(f"pretrained={tmp_path},batch_size=2", {"device": "cpu"})
    assert isinstance(lm, GPT2LabLM) and lm.batch_size == 2 and lm.max_length == BLOCK
    with pytest.raises(GPT2LabError, match="batch_size must be an integer"):
        GPT2LabLM(model, batch_size="auto")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "EXISTING"], "exists; pass --overwrite"),
        (["--include-path", "NOWHERE"], "is not a folder of task YAML files"),
        (["--tasks", " , "], "no harness task named"),
    ],
)
def test_bad_requests_are_one_line(tmp_path, capsys, extra, message):
    (tmp_path / "EXISTING").write_text("keep me")
    extra = [str(tmp_path / e) if e in ("EXISTING", "NOWHERE") else e for e in extra]
    assert main(["harness", "--model", "unused", "--tasks", "gpt2lab_rolling", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert (tmp_path / "EXISTING").read_text() == "keep me"
