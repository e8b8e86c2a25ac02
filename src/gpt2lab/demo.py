"""``gpt2lab demo``: prepare the embedded corpus, train (or fine-tune), report validation loss, sample.

Everything runs offline from a fresh clone: the corpus is the Python documentation that ships with
CPython (``pydoc_data``), and the settings are :class:`TrainConfig`'s defaults (= configs/demo.toml).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import GPT2LabError
from .data import prepare
from .generation import stream_text
from .model import GPT
from .run_state import check_run_folder, load_model
from .tokenizer import load_tokenizer
from .train_config import TrainConfig
from .training import train


def _load_pretrained(name: str) -> GPT | None:
    """The checkpoint, or None (after saying why) when a hub id cannot be fetched: the demo then
    trains from scratch. A local path that fails to load is a real error and propagates."""
    try:
        return load_model(name)
    except GPT2LabError as e:
        if Path(name).exists():
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
        cfg.batch_size, cfg.block_size, cfg.eval_iters = 4, 128, 4
        cfg.eval_interval = cfg.ckpt_interval = cfg.max_iters
    if max_iters is not None:
        cfg.max_iters = max_iters
        cfg.eval_interval = min(cfg.eval_interval, max_iters)
    cfg.validate()
    return cfg


def run_demo(
    out_dir: str,
    data_dir: str,
    pretrained: str | None = None,
    max_iters: int | None = None,
    prompt: str = "The",
    overwrite: bool = False,
) -> int:
    check_run_folder(Path(out_dir), resume=False, overwrite=overwrite)  # before anything is prepared or trained
    if not (Path(data_dir) / "meta.json").is_file():
        print(f"preparing the embedded Python documentation corpus in {data_dir}")
        prepare("pydoc", data_dir)
    if pretrained is not None:
        model = _load_pretrained(pretrained)
        if model is None:
            pretrained = None
        else:
            _parity_check(pretrained, model)
    cfg = demo_config(out_dir, data_dir, pretrained, max_iters)
    what = f"fine-tuning {pretrained}" if pretrained else "training a small GPT from scratch"
    print(f"{what} on {data_dir}: {cfg.max_iters} steps of {cfg.batch_size}×{cfg.block_size} tokens -> {out_dir}")
    summary = train(cfg, overwrite=overwrite)
    if summary["stopped"]:
        print(f"stopped at step {summary['step']}; continue with: gpt2lab train --out {out_dir} --resume")
        return 128 + summary["signal"]
    print(f"validation loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.1f})")
    model = load_model(out_dir)
    print(f"\nsample (prompt {prompt!r}):\n{prompt}", end="")
    for piece in stream_text(model, load_tokenizer(), prompt, 120, temperature=0.8, top_k=50, seed=0):
        print(piece, end="", flush=True)
    print(
        f"\n\nmore: gpt2lab generate --model {out_dir} --prompt '...'; gpt2lab eval --model {out_dir} --data {data_dir}"
    )
    return 0
