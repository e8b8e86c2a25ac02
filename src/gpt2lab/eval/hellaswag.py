"""HellaSwag (Zellers et al. 2019): pick the right ending of a sentence among four, by language-model loss.

Scoring is llm.c's: the context and each ending (with a leading space) are one token row; the loss of
the *ending's* tokens is averaged per token, and the ending with the lowest mean loss is the model's
choice. Its accuracy is ``acc_norm`` (OpenAI's gpt2 scores 29.55 % on the validation set this way;
lm-eval's multiple-choice ``acc_norm``, which normalises by characters, gives 31.14 %). ``acc`` picks
the lowest *summed* loss instead, and is reported beside it.

The file is HellaSwag's jsonl: one object per line with ``ctx``, ``endings`` (four strings) and
``label`` (the index of the right one). ``val`` names the official validation file, downloaded once
into the cache folder (``$GPT2LAB_CACHE``, else ``~/.cache/gpt2lab``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt2lab.errors import GPT2LabError
from gpt2lab.files import write_bytes
from gpt2lab.tokenizer import load_tokenizer

OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
OFFICIAL_NAME = "val"
DOWNLOAD_TIMEOUT_S = 60


@dataclass
class Example:
    rows: list[list[int]]  # context + ending tokens, one row per ending
    ending_starts: list[int]  # index in its row of each ending's first token
    label: int


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2LAB_CACHE") or Path.home() / ".cache" / "gpt2lab")


def resolve_file(spec: str | Path) -> Path:
    """A local jsonl file, or ``val``: the official validation file, downloaded atomically on first use."""
    if str(spec) != OFFICIAL_NAME:
        path = Path(spec)
        if not path.is_file():
            raise GPT2LabError(f"no HellaSwag file {path}; give a jsonl file, or 'val' to download the official one")
        return path
    path = cache_dir() / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(OFFICIAL_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise GPT2LabError(
            f"cannot download HellaSwag ({getattr(e, 'reason', e)}); fetch {OFFICIAL_URL} elsewhere and pass its path"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)  # whole or not at all: a cut download never becomes the cached file
    return path


def _parse_line(line: str, where: str) -> tuple[str, list[str], int]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise GPT2LabError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(item, dict):
        raise GPT2LabError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = item.get("ctx"), item.get("endings"), item.get("label")
    if not isinstance(ctx, str) or not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise GPT2LabError(f"{where}: 'ctx' must be a string and 'endings' a list of strings")
    if len(endings) < 2 or not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise GPT2LabError(f"{where}: needs at least two endings and a label indexing one of them, got {label!r}")
    return ctx, endings, label


def load_examples(path: str | Path, limit: int | None = None, vocab_size: int | None = None) -> list[Example]:
    """The examples of a HellaSwag jsonl file, tokenized with GPT-2's BPE; a malformed line is one error naming
    it. ``vocab_size`` is the model's: a model with another tokenizer cannot be scored."""
    enc = load_tokenizer()
    if vocab_size is not None and vocab_size < enc.n_vocab:
        raise GPT2LabError(
            f"HellaSwag is scored with the GPT-2 tokenizer ({enc.n_vocab} tokens); this model has {vocab_size}"
        )
    path = resolve_file(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            ctx, endings, label = _parse_line(line, f"{path} line {number}")
            context = enc.encode_ordinary(ctx)
            rows = [context + enc.encode_ordinary(" " + ending) for ending in endings]
            examples.append(Example(rows, [len(context)] * len(rows), label))
    if not examples:
        raise GPT2LabError(f"{path} holds no HellaSwag examples")
    return examples


def _batch(example: Example, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, mask) of shape (n_endings, T): right-padded token rows and 1 on the tokens of each ending.

    A row longer than the context (block_size inputs + 1 target) keeps its last tokens, so the ending
    is scored whole whenever it fits.
    """
    rows, starts = [], []
    for row, start in zip(example.rows, example.ending_starts, strict=True):
        cut = max(0, len(row) - (block_size + 1))
        rows.append(row[cut:])
        starts.append(max(start - cut, 1))  # the first token has no prediction
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, start : len(row)] = 1
    return tokens, mask


@torch.no_grad()
def score_example(model: torch.nn.Module, example: Example, block_size: int, device: torch.device) -> tuple[int, int]:
    """The ending chosen by lowest summed loss and by lowest mean loss per token (acc, acc_norm)."""
    tokens, mask = _batch(example, block_size)
    tokens, mask = tokens.to(device), mask.to(device)
    logits = model(tokens[:, :-1])  # (E, T-1, vocab); padding sits after every ending: causal, unseen
    losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    losses = losses.view(tokens.shape[0], -1) * mask[:, 1:]
    summed = losses.sum(dim=1)
    return int(summed.argmin()), int((summed / mask[:, 1:].sum(dim=1)).argmin())


def evaluate_hellaswag(
    model: torch.nn.Module, examples: list[Example], block_size: int, rank: int = 0, world: int = 1, progress=False
) -> dict[str, float]:
    """Correct counts (acc, acc_norm) over this rank's share of ``examples`` (every ``world``-th one).

    Every rank runs the same number of forwards (the last of a shorter share is repeated, uncounted):
    a DDP or FSDP model's forward is a collective, so unequal counts would hang.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = list(range(rank, len(examples), world))
    rounds = -(-len(examples) // world)
    correct = correct_norm = 0
    for i in tqdm(range(rounds), desc="hellaswag", disable=not progress):
        index = mine[min(i, len(mine) - 1)] if mine else 0
        pick, pick_norm = score_example(model, examples[index], block_size, device)
        if i < len(mine):
            correct += pick == examples[index].label
            correct_norm += pick_norm == examples[index].label
    model.train(was_training)
    return {"examples": len(mine), "correct": correct, "correct_norm": correct_norm}


def accuracies(counts: dict[str, float]) -> dict[str, float]:
    """acc and acc_norm from (possibly summed over ranks) correct counts."""
    n = max(counts["examples"], 1)
    return {"hellaswag_acc": counts["correct"] / n, "hellaswag_acc_norm": counts["correct_norm"] / n}
