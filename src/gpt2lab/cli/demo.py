"""``gpt2lab demo``: the first thing a newcomer runs, offline: about 250 CPU-seconds of training.

It trains a small character-level GPT on Tiny Shakespeare (shipped with the package), reports its
validation loss beside what unigram and bigram count models score on the same characters, and samples
text that reads like a play. The settings are :class:`TrainConfig`'s defaults (= configs/demo.toml).
``--pretrained`` fine-tunes a GPT-2 checkpoint instead, on the Python documentation that ships with
CPython (GPT-2's BPE: a pretrained model reads the tokens it was trained on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpt2lab.data.count_models import bigram_loss, unigram_loss
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval.loss import evaluate
from gpt2lab.generation import stream_text
from gpt2lab.loading import load_model, load_model_and_tokenizer
from gpt2lab.model import GPT
from gpt2lab.outputs import DATA, META_FILE, guard_output
from gpt2lab.tokenizer import load_tokenizer
from gpt2lab.train.config import TrainConfig
from gpt2lab.train.loop import train
from gpt2lab.train.run import check_run_folder

DATA_DIRS = {"scratch": "data/shakespeare-char", "pretrained": "data/pydoc"}
PROMPTS = {"scratch": "ROMEO:\n", "pretrained": "The for statement"}


def _load_pretrained(name: str) -> GPT | None:
    """The checkpoint, or None (after saying why) when the hub cannot be reached for a hub id: the demo
    then trains from scratch. Anything else that fails to load (a mistyped path, a damaged folder, a name
    the hub does not have) is an error: the user asked for that model."""
    try:
        return load_model(name)
    except GPT2LabError as e:
        if Path(name).exists() or "offline" not in str(e):
            raise
        print(f"cannot load '{name}' ({e}); training from scratch instead")
        return None


def _parity_check(name: str, model: GPT) -> None:
    """Compare our logits with transformers' GPT2LMHeadModel on one sentence, when transformers and a
    local copy of the hub-layout checkpoint are available (no download is attempted)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return
    try:
        reference = GPT2LMHeadModel.from_pretrained(name, local_files_only=True).eval()
    except (OSError, ValueError):
        return  # not hub layout (gpt2lab folder, TF checkpoint) or not cached locally
    ids = torch.tensor([load_tokenizer().encode("Hello, my name is GPT-2 and I like")])
    with torch.no_grad():
        ours = model.eval()(ids)
        theirs = reference(ids).logits
    print(f"parity vs transformers.GPT2LMHeadModel: max |logit difference| = {(ours - theirs).abs().max().item():.2e}")


def demo_config(out_dir: str, data_dir: str, pretrained: str | None, max_iters: int | None) -> TrainConfig:
    cfg = TrainConfig(out_dir=out_dir, data_dir=data_dir)
    if pretrained is not None:
        # Fine-tuning a 124M+ model on CPU: short sequences, few steps, a small learning rate.
        cfg.init_from, cfg.preset, cfg.model = pretrained, None, {}
        cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters = 1e-4, 1e-5, 5, 30
        cfg.batch_size, cfg.seq_len, cfg.eval_iters = 4, 128, 4
        cfg.eval_interval = cfg.ckpt_interval = cfg.max_iters
    if max_iters is not None:
        cfg.max_iters = max_iters
        cfg.eval_interval = min(cfg.eval_interval, max_iters)
    cfg.validate()
    return cfg


def _prepare_data(data_dir: str, pretrained: str | None) -> None:
    if (Path(data_dir) / META_FILE).is_file():
        return
    if pretrained is None:
        print(f"preparing Tiny Shakespeare (shipped with gpt2lab) as characters in {data_dir}")
        prepare("shakespeare", data_dir, tokenizer="char")
    else:
        print(f"preparing the embedded Python documentation corpus in {data_dir}")
        prepare("pydoc", data_dir)


def report_loss(model: GPT, data: TokenData, context: int, max_tokens: int) -> dict[str, float]:
    """The model's loss on (up to ``max_tokens`` of) the validation split, beside the unigram's and bigram's
    on the same targets."""
    val = np.asarray(data.val[: max_tokens + 1])
    result = evaluate(model, val, context=min(context, len(val) - 1), tokenizer=data.tokenizer)
    scored = val[: result.tokens + 1]  # evaluate's targets are scored[1:]: the count models score the same
    losses = {
        "model": result.loss,
        "unigram": unigram_loss(data.train, scored, data.vocab_size),
        "bigram": bigram_loss(data.train, scored, data.vocab_size),
    }
    unit = "character" if data.tokenizer.name == "char" else "token"
    print(
        f"validation loss {losses['model']:.4f} nats per {unit} (perplexity {result.perplexity:.2f}) on "
        f"{result.tokens:,} validation {unit}s of {data.path}\n"
        f"  the same {unit}s cost {losses['unigram']:.4f} to a unigram model (how often each {unit} occurs) and "
        f"{losses['bigram']:.4f} to a bigram model (the previous {unit}), both counted on the train split"
    )
    return losses


def run_demo(
    out_dir: str,
    data_dir: str | None = None,
    pretrained: str | None = None,
    max_iters: int | None = None,
    prompt: str | None = None,
    overwrite: bool = False,
) -> int:
    check_run_folder(Path(out_dir), resume=False, overwrite=overwrite)  # before anything is prepared or trained
    if data_dir is not None and not (Path(data_dir) / "meta.json").is_file():
        guard_output(data_dir, DATA)  # the demo prepares it: never into a folder of something else
    kind = "scratch" if pretrained is None else "pretrained"
    data_dir = data_dir or DATA_DIRS[kind]
    prompt = PROMPTS[kind] if prompt is None else prompt
    if pretrained is not None:  # before the data is prepared: a model that does not load fails at once
        model = _load_pretrained(pretrained)
        if model is None:
            pretrained = None
        else:
            _parity_check(pretrained, model)
    _prepare_data(data_dir, pretrained)
    cfg = demo_config(out_dir, data_dir, pretrained, max_iters)
    what = f"fine-tuning {pretrained}" if pretrained else "training a small GPT from scratch"
    print(f"{what} on {data_dir}: {cfg.max_iters} steps of {cfg.batch_size}×{cfg.seq_len} tokens -> {out_dir}")
    summary = train(cfg, overwrite=overwrite)
    if summary["stopped"]:
        print(f"stopped at step {summary['step']}; continue with: gpt2lab train --out {out_dir} --resume")
        return 128 + summary["signal"]
    model, tokenizer = load_model_and_tokenizer(out_dir)
    # The whole validation split of Tiny Shakespeare (111,540 characters) takes seconds; a fine-tuned 124M
    # model is measured on as many tokens as its last evaluation.
    max_tokens = 1 << 17 if pretrained is None else cfg.eval_iters * cfg.batch_size * cfg.seq_len
    report_loss(model, TokenData.open(data_dir), cfg.seq_len, max_tokens)
    _sample(model, tokenizer, prompt)
    print(
        f"\n\nmore: gpt2lab generate --model {out_dir} --prompt '...'; gpt2lab eval --model {out_dir} --data {data_dir}"
    )
    return 0


def _sample(model: GPT, tokenizer, prompt: str) -> None:
    """A few lines of characters (500), or 120 BPE tokens; no more than the context holds with learned positions.

    The demo's model (RoPE, every layer windowed to its training length) writes any length: each
    character sees at most the 128 before it, at relative distances it was trained on."""
    length = 120 if tokenizer.eot_token is not None else 500
    if model.config.pos_encoding == "learned":
        length = min(length, model.config.block_size - len(tokenizer.encode(prompt)))
    pieces = stream_text(model, tokenizer, prompt, max(length, 0), temperature=0.8, top_k=50, seed=0)
    print(f"\nsample (prompt {prompt!r}):\n{prompt}", end="")
    for piece in pieces:
        print(piece, end="", flush=True)
