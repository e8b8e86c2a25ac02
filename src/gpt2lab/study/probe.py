"""The receptive-field probe: a synthetic passkey task at distance d, trained on each variant's shape.

A sequence of ``context`` tokens holds filler symbols, one key symbol (from a separate alphabet) at
position ``context - 1 - d`` and a query marker at the last position, where the model must name the key.
A model can only answer if the key is within its receptive field: d <= sum over layers of (W_i - 1)
for a windowed model (:func:`gpt2lab.study.suite.receptive_reach`), any d for full attention. So a
windowed variant must fall to chance (1 / keys) just beyond its reach, whatever it learned, and can be
right within it. ``key_visible`` checks the first half exactly: it changes the key and asks whether the
answer's logits move at all — the window convention tested end to end through the trained model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT

FILLERS = 16  # filler symbols 0..15
KEYS = 8  # key symbols 16..23: chance accuracy is 1/8
QUERY = FILLERS + KEYS  # the query marker
PROBE_VOCAB = QUERY + 1


def passkey_batch(batch: int, context: int, distances: torch.Tensor, gen: torch.Generator):
    """(inputs (B, context), key ids (B,)): the key at ``context - 1 - d``, the query marker last."""
    x = torch.randint(0, FILLERS, (batch, context), generator=gen)
    keys = torch.randint(FILLERS, FILLERS + KEYS, (batch,), generator=gen)
    x[torch.arange(batch), context - 1 - distances] = keys
    x[:, -1] = QUERY
    return x, keys


def sample_distances(batch: int, context: int, gen: torch.Generator) -> torch.Tensor:
    """Training distances in 1..context-1, log-uniform: short ones are common enough that a windowed
    model (which can answer only those) learns them, long ones common enough for full attention."""
    u = torch.rand(batch, generator=gen)
    return torch.exp(u * torch.log(torch.tensor(float(context)))).long().clamp(1, context - 1)


def _answer_logits(model, x: torch.Tensor) -> torch.Tensor:
    """The model's logits over the key alphabet at the query position: (B, KEYS)."""
    return model(x, last_only=True)[:, -1, FILLERS : FILLERS + KEYS]


def train_probe(config: GPTConfig, settings: dict, seed: int):
    """A fresh model of ``config`` (probe vocabulary) trained on passkeys at distances 1..context-1."""
    torch.manual_seed(seed)
    context = settings["context"]
    model = GPT(config.replace(vocab_size=PROBE_VOCAB, block_size=context, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(settings["steps"]), desc="probe", unit="step")
    for _ in bar:
        d = sample_distances(settings["batch_size"], context, gen)
        x, keys = passkey_batch(settings["batch_size"], context, d, gen)
        loss = F.cross_entropy(_answer_logits(model, x), keys - FILLERS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def key_visible(model, context: int, distance: int) -> bool:
    """Whether the answer's logits depend on a key ``distance`` tokens back (all else held fixed)."""
    gen = torch.Generator().manual_seed(0)
    x, _ = passkey_batch(4, context, torch.full((4,), distance), gen)
    other = x.clone()
    other[:, context - 1 - distance] = FILLERS + (x[:, context - 1 - distance] - FILLERS + 1) % KEYS
    return not torch.equal(_answer_logits(model, x), _answer_logits(model, other))


@torch.no_grad()
def accuracy_by_distance(model, context: int, distances: list[int], samples: int) -> list[float]:
    """Share of ``samples`` fresh passkeys answered right at each distance (argmax over the keys)."""
    gen = torch.Generator().manual_seed(12345)  # the same test sequences for every variant
    accuracies = []
    for d in distances:
        x, keys = passkey_batch(samples, context, torch.full((samples,), d), gen)
        accuracies.append(float((_answer_logits(model, x).argmax(-1) == keys - FILLERS).float().mean()))
    return accuracies


def probe_distances(settings: dict, reaches: list[int | None]) -> list[int]:
    """The distances probed: the suite's list, else a spread over the context plus each windowed
    variant's reach and reach + 1 (the two sides of its boundary)."""
    context = settings["context"]
    if settings.get("distances"):
        return sorted(d for d in settings["distances"] if 1 <= d < context)
    spread = {1, 2, 4, 8, context // 4, context // 2, (3 * context) // 4, context - 1}
    edges = {d for r in reaches if r is not None for d in (r, r + 1)}
    return sorted(d for d in spread | edges if 1 <= d < context)


def run_probe(config_fields: dict, settings: dict, seed: int, distances: list[int]) -> dict:
    """Train one variant's probe and measure it. Runs in its own process (see study.run_isolated)."""
    config = GPTConfig.from_dict({**config_fields, "vocab_size": PROBE_VOCAB})
    model = train_probe(config, settings, seed)
    context = settings["context"]
    return {
        "accuracy": accuracy_by_distance(model, context, distances, settings["samples"]),
        "visible": [key_visible(model, context, d) for d in distances],
    }
