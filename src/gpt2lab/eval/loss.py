"""Held-out evaluation: loss, perplexity, bits per byte, and loss by position in the context.

Bits per byte divides the total loss (converted to bits) by the UTF-8 bytes the evaluated targets
cover, so it compares models with different tokenizers; perplexity does not.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2lab.data.tokens import TokenData
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import atomic_file
from gpt2lab.model import GPT
from gpt2lab.outputs import EVAL_FILES
from gpt2lab.plots import plot_loss_by_position
from gpt2lab.tokenizer import Tokenizer, describe, load_tokenizer, same_tokenizer, token_byte_lengths


def load_tokens(path: str | Path, tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, int, str]:
    """(token ids, total bytes, description): a prepared folder's val split, or a text file tokenized now.

    ``tokenizer`` is the model's (GPT-2's BPE when None): a prepared folder must have been made with it.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    p = Path(path)
    if p.is_dir():
        data = TokenData.open(p)
        if not same_tokenizer(data.tokenizer, tokenizer):
            raise GPT2LabError(
                f"{p} was prepared with {describe(data.tokenizer)} but the model reads {describe(tokenizer)}"
            )
        return np.asarray(data.val), data.meta["val_bytes"], f"{p}/val.bin"
    if not p.is_file():
        raise GPT2LabError(f"no such file or prepared folder: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise GPT2LabError(f"{p} is empty")
    return np.array(tokenizer.encode_ordinary(text), dtype=np.int64), len(text.encode("utf-8")), str(p)


@dataclass
class EvalResult:
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int  # evaluated targets
    bytes: int  # UTF-8 bytes those targets cover
    by_position: np.ndarray  # (context,) mean loss at each position of the window


@torch.no_grad()
def evaluate(
    model: GPT,
    tokens: np.ndarray,
    context: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> EvalResult:
    """Score ``tokens`` in non-overlapping windows of ``context`` targets (each window starts fresh, so
    position p has seen exactly p earlier tokens: that is what makes the by-position curve meaningful).

    ``context`` defaults to the model's block_size; longer contexts work only for RoPE models.
    ``tokenizer`` (GPT-2's BPE when None) gives each token's bytes, for bits per byte.
    """
    config = model.config
    context = context or config.block_size
    config.check_length(context)
    n_windows = (len(tokens) - 1) // context
    if n_windows < 1:
        raise GPT2LabError(
            f"evaluation needs at least {context + 1} tokens for a context of {context}; got {len(tokens)}"
        )
    if max_tokens is not None:
        if max_tokens < context:  # one window scores `context` targets: fewer cannot be evaluated as asked
            raise GPT2LabError(
                f"max_tokens {max_tokens} is less than one window of context {context}: raise max_tokens to at "
                f"least {context}, or lower the context"
            )
        n_windows = min(n_windows, max_tokens // context)
    vocab = config.vocab_size
    if int(tokens[: n_windows * context + 1].max()) >= vocab:
        raise GPT2LabError(f"the data has token ids >= the model's vocab size {vocab}: another tokenizer?")
    byte_len = torch.from_numpy(token_byte_lengths(tokenizer))
    model.eval()
    device = model.device
    position_sum = torch.zeros(context, dtype=torch.float64)
    n_bytes = 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        batch = torch.from_numpy(
            np.stack([tokens[r * context : r * context + context + 1] for r in rows]).astype(np.int64)
        )
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        logits = model(x)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape)
        position_sum += losses.double().sum(dim=0).cpu()
        n_bytes += int(byte_len[y.cpu()].sum())
    n_tokens = n_windows * context
    total = float(position_sum.sum())
    loss = total / n_tokens
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        bits_per_byte=total / math.log(2) / max(n_bytes, 1),
        tokens=n_tokens,
        bytes=n_bytes,
        by_position=(position_sum / n_windows).numpy(),
    )


def write_by_position(result: EvalResult, out_dir: str | Path, trained_context: int | None = None) -> tuple[Path, Path]:
    """``loss_by_position.csv`` and ``.png``; a dashed line marks the trained context when it is shorter."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = (out / name for name in EVAL_FILES)
    with atomic_file(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position", "loss"])
        writer.writerows((i, f"{v:.6f}") for i, v in enumerate(result.by_position))
    plot_loss_by_position(result.by_position, png_path, trained_context)
    return csv_path, png_path
