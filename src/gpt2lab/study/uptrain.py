"""The uptraining curve (Ainslie et al. 2023): GQA and MQA converted from each seed's trained baseline,
then trained on for a fraction of the baseline's pre-training steps, at several fractions.

The control continues the unconverted multi-head baseline for the same steps with the same schedule,
so "converted + k steps" is compared with "baseline + k steps" seed by seed, not with a baseline that
stopped earlier. At one fraction the first-head initialisation (GQA) is trained beside mean pooling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gpt2lab.eval.loss import evaluate
from gpt2lab.loading import load_model
from gpt2lab.study.runs import Runs, eval_tokens
from gpt2lab.study.stats import paired_difference

DEFAULTS = {"n_kv_heads": [2, 1], "fractions": [0.0, 0.025, 0.05, 0.1, 0.2], "first_head_fraction": 0.05}


@torch.no_grad()
def converted_losses(base_dirs: list[str], n_kv_head: int, init: str, data_dir: str, context: int, max_tokens):
    """Evaluation loss of each trained baseline right after its K/V heads are merged, before any training."""
    tokens = eval_tokens(data_dir, context, max_tokens)
    models = (load_model(d).convert_to_gqa(n_kv_head, init=init) for d in base_dirs)
    return [evaluate(model, tokens, context=context).loss for model in models]


def _fields(base_dirs: dict[int, str], steps: int, n_kv_head: int | None, init: str, seed: int) -> dict[str, Any]:
    """TrainConfig fields of one continuation of ``seed``'s baseline (converted unless ``n_kv_head`` is None)."""
    return {
        "preset": None,
        "model": {},
        "init_from": base_dirs[seed],
        "convert_n_kv_head": n_kv_head,
        "convert_kv_init": init,
        "max_iters": steps,
        "warmup_iters": max(1, steps // 10),
        "eval_interval": steps,
        "ckpt_interval": steps,
    }


def run_uptraining(suite, runs: Runs, base_losses: dict[int, float], context: int, log) -> list[dict]:
    """One row per (method, n_kv_head, fraction, seed): its steps and evaluation loss.

    method: ``control`` (baseline continued), ``mean`` (K/V heads mean-pooled), ``first`` (first head
    of each group). Fraction 0 is the conversion alone (the control at 0 is the baseline itself).
    """
    up = {**DEFAULTS, **suite.uptrain}
    total = int(suite.train["max_iters"])
    base_dir = {seed: str(runs.runs_dir / f"baseline-s{seed}") for seed in suite.seeds}
    data_dir, max_tokens = runs.base_fields["data_dir"], suite.eval["max_tokens"]
    settings = {**runs.settings, "extrapolation": None}  # uptrained models are scored at the trained context
    rows: list[dict] = []

    def add(method: str, n_kv: int | None, fraction: float, steps: int, losses: list[float]) -> None:
        for seed, loss in zip(suite.seeds, losses, strict=True):
            rows.append(
                {
                    "method": method,
                    "n_kv_head": n_kv or "",
                    "fraction": fraction,
                    "steps": steps,
                    "seed": seed,
                    "val_loss": loss,
                }
            )

    plan = [("control", None, f) for f in up["fractions"]]
    plan += [("mean", n, f) for f in up["fractions"] for n in up["n_kv_heads"]]
    plan.append(("first", up["n_kv_heads"][0], up["first_head_fraction"]))  # GQA's K/V init, at one fraction
    plan = [(method, n_kv, fraction, round(fraction * total)) for method, n_kv, fraction in plan]
    trained = {}  # (method, n_kv, fraction) -> run name, for the cells that train at all
    jobs = []
    for method, n_kv, fraction, steps in plan:
        if steps > 0:
            name = f"continue-{steps}" if method == "control" else f"uptrain-{method}-kv{n_kv}-{steps}"
            init = "mean" if method == "control" else method
            trained[(method, n_kv, fraction)] = name
            jobs += [(name, seed, _fields(base_dir, steps, n_kv, init, seed)) for seed in suite.seeds]
    log(f"[study] uptraining: {len(jobs)} continuations of the baselines")
    done = runs.many(jobs, settings)
    losses_of = {(name, seed): r["val_loss"] for (name, seed, _), r in zip(jobs, done, strict=True)}
    for method, n_kv, fraction, steps in plan:
        if (method, n_kv, fraction) in trained:
            losses = [losses_of[(trained[(method, n_kv, fraction)], s)] for s in suite.seeds]
        elif method == "control":
            losses = [base_losses[s] for s in suite.seeds]  # the baseline itself
        else:  # the conversion alone, before any training
            dirs = [base_dir[s] for s in suite.seeds]
            losses = runs.isolated(converted_losses, dirs, n_kv, method, data_dir, context, max_tokens)
        add(method, n_kv, fraction, steps, losses)
    return rows


def uptrain_pairs(rows: list[dict]) -> list[dict]:
    """Each converted cell's paired difference to the control at the same fraction (same seeds)."""
    control = {(r["fraction"], r["seed"]): r["val_loss"] for r in rows if r["method"] == "control"}
    cells = dict.fromkeys(
        (r["method"], r["n_kv_head"], r["fraction"], r["steps"]) for r in rows if r["method"] != "control"
    )
    out = []
    for method, n_kv, fraction, steps in cells:
        mine = {
            r["seed"]: r["val_loss"]
            for r in rows
            if (r["method"], r["n_kv_head"], r["fraction"]) == (method, n_kv, fraction)
        }
        ref = {seed: control[(fraction, seed)] for seed in mine if (fraction, seed) in control}
        mean_loss = float(np.mean(list(mine.values())))
        out.append(
            {
                "method": method,
                "n_kv_head": n_kv,
                "fraction": fraction,
                "steps": steps,
                "val_loss": mean_loss,
                **paired_difference(mine, ref),
            }
        )
    return out
