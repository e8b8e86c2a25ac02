"""Sound uptraining: a continuation starts from the reference's FINAL training state, not from its
weights in a fresh optimizer.

:func:`seed_continuation` writes the baseline's last checkpoint into the continuation's run folder as
its own starting checkpoint: same weights, same AdamW moments and step count, same data-order RNG, so
the continuation draws the batches the baseline would have drawn next. Converted to fewer K/V heads,
the packed K/V rows of every ``c_attn`` are pooled (:func:`gpt2lab.checkpoints.convert.pool_kv_heads`)
and so are their Adam moments, the same way as the weights: ``exp_avg`` and ``exp_avg_sq`` of a pooled
head are the group's mean (``init="mean"``) or its first head's (``init="first"``). The mean of the
second moments over-estimates the second moment of the mean gradient (by Jensen), so the first updates
of pooled heads are, if anything, smaller than Adam's usual: no re-warm-up is needed, and none is done.

The continuation's schedule is the baseline's run past its end: ``lr_decay_iters`` is the baseline's
``max_iters``, so the learning rate stays at ``min_lr`` (where the baseline ended) for every extra step.
The trainer then resumes this checkpoint like any interrupted run.
"""

from __future__ import annotations

from pathlib import Path

from gpt2lab.checkpoints.convert import pool_kv_heads
from gpt2lab.checkpoints.train_state import load_checkpoint, save_checkpoint
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.outputs import CKPT_NAME


def continuation_fields(base_fields: dict, base_config: GPTConfig, steps: int, n_kv_head: int | None) -> dict:
    """TrainConfig fields of a continuation for ``steps`` past the baseline's end (converted to
    ``n_kv_head`` K/V heads unless None): the baseline's fields, its schedule extended flat at min_lr."""
    total = int(base_fields["max_iters"])
    model = {k: v for k, v in base_config.to_dict().items() if k != "vocab_size"}
    if n_kv_head is not None:
        model["n_kv_head"] = n_kv_head
    return {
        "preset": None,
        "model": model,
        "max_iters": total + steps,
        "lr_decay_iters": total,
        "eval_interval": total + steps,
        "ckpt_interval": total + steps,
    }


def seed_continuation(base_dir: str, run_dir: str, train_config: dict, n_kv_head: int | None, init: str) -> None:
    """Write the baseline's final checkpoint (K/V heads and their Adam moments pooled when ``n_kv_head``
    is given) as ``run_dir``'s checkpoint, recorded with the continuation's own ``train_config``."""
    target = Path(run_dir) / CKPT_NAME
    if target.is_file():
        return  # seeded earlier (an interrupted continuation resumes from its own checkpoint)
    source = Path(base_dir) / CKPT_NAME
    if not source.is_file():
        raise GPT2LabError(f"uptraining needs the baseline's final checkpoint {source}; re-run its training")
    state = load_checkpoint(source)
    if state["step"] != int(state["train_config"]["max_iters"]):
        raise GPT2LabError(f"{source} is not at the end of its schedule (step {state['step']})")
    if n_kv_head is not None:
        config = GPTConfig.from_dict(state["model_config"])
        new_config, state["model"] = pool_kv_heads(config, state["model"], n_kv_head, init)
        state["model_config"] = new_config.to_dict()
        moments = state["optimizer"].get("state", {})
        for key in ("exp_avg", "exp_avg_sq"):
            by_name = {name: entry[key] for name, entry in moments.items() if key in entry}
            _, pooled = pool_kv_heads(config, by_name, n_kv_head, init)
            for name, tensor in pooled.items():
                moments[name][key] = tensor
    state["train_config"] = train_config
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, state)
