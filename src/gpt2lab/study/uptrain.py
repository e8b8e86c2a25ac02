"""The uptraining curve (Ainslie et al. 2023): GQA and MQA converted from each seed's trained baseline,
then trained on for a fraction of the baseline's pre-training steps, at several fractions.

Every continuation starts from the baseline's final training state (weights, AdamW moments, step and
data order; :mod:`gpt2lab.study.continuation`) and runs its schedule on, flat at the final learning
rate, so nothing is re-warmed. Two comparisons per converted cell, seed by seed:

* ``control``: the unconverted multi-head baseline continued for the same steps the same way;
* ``scratch``: the converted shape trained from scratch for the same total steps (baseline + uptraining,
  its own schedule over them), at the largest fraction: the same compute spent without the baseline.

At one fraction the first-head initialisation (GQA) is trained beside mean pooling.
"""

from __future__ import annotations

import numpy as np
import torch

from gpt2lab.data.tokens import TokenData
from gpt2lab.eval.loss import evaluate
from gpt2lab.loading import load_model
from gpt2lab.study.continuation import continuation_fields
from gpt2lab.study.runs import OutOfTime, Runs, eval_tokens
from gpt2lab.study.stats import paired_difference

DEFAULTS = {"n_kv_heads": [2, 1], "fractions": [0.0, 0.025, 0.05, 0.1, 0.2], "first_head_fraction": 0.05}


@torch.no_grad()
def converted_losses(base_dirs: list[str], n_kv_head: int, init: str, data_dir: str, context: int, max_tokens):
    """Evaluation loss of each trained baseline right after its K/V heads are merged, before any training."""
    tokens = eval_tokens(data_dir, context, max_tokens)
    models = (load_model(d).convert_to_gqa(n_kv_head, init=init) for d in base_dirs)
    return [evaluate(model, tokens, context=context).loss for model in models]


def _plan(up: dict, total: int) -> list[tuple[str, int | None, float, int]]:
    """(method, n_kv_head, fraction, steps) of every cell of the curve."""
    plan = [("control", None, f) for f in up["fractions"]]
    plan += [("mean", n, f) for f in up["fractions"] for n in up["n_kv_heads"]]
    plan.append(("first", up["n_kv_heads"][0], up["first_head_fraction"]))  # GQA's K/V init, at one fraction
    plan += [("scratch", n, max(up["fractions"])) for n in up["n_kv_heads"]]
    return [(method, n_kv, fraction, round(fraction * total)) for method, n_kv, fraction in plan]


def _job(suite, runs: Runs, config, base_dirs: dict, cell: tuple, seed: int) -> tuple:
    """(name, seed, fields, settings) of one trained cell."""
    method, n_kv, _, steps = cell
    total = int(suite.train["max_iters"])
    model = {k: v for k, v in config.to_dict().items() if k != "vocab_size"}
    if method == "scratch":  # the converted shape from step 0, for the baseline's steps + the uptraining's
        fields = {"preset": None, "model": {**model, "n_kv_head": n_kv}, "max_iters": total + steps}
        return f"scratch-kv{n_kv}-{total + steps}", seed, fields, runs.settings
    name = f"continue-{steps}" if method == "control" else f"uptrain-{method}-kv{n_kv}-{steps}"
    fields = continuation_fields(suite.train, config, steps, n_kv)
    source = {"base_dir": base_dirs[seed], "n_kv_head": n_kv, "init": "mean" if method == "control" else method}
    return name, seed, fields, {**runs.settings, "continue_from": source}


def run_uptraining(suite, runs: Runs, base_losses: dict[int, float], context: int, log) -> list[dict]:
    """One row per (method, n_kv_head, fraction, seed): its steps and evaluation loss; [] while some
    continuation is unfinished (out of time). method: ``control``, ``mean``, ``first`` or ``scratch``;
    fraction 0 is the conversion alone (the control at 0 is the baseline itself); a scratch row's steps are
    the uptraining steps it matches (it trains the baseline's max_iters + steps)."""
    up = {**DEFAULTS, **suite.uptrain}
    total = int(suite.train["max_iters"])
    vocab_size = int(TokenData.open(runs.base_fields["data_dir"]).meta["vocab_size"])
    config = suite.variant_config(suite.variants[0], vocab_size)
    base_dirs = {seed: str(runs.runs_dir / f"baseline-s{seed}") for seed in suite.seeds}
    data_dir, max_tokens = runs.base_fields["data_dir"], suite.eval["max_tokens"]
    plan = _plan(up, total)
    trained = [cell for cell in plan if cell[3] > 0]
    jobs = [_job(suite, runs, config, base_dirs, cell, seed) for cell in trained for seed in suite.seeds]
    jobs = [(name, seed, fields, {**settings, "extrapolation": None}) for name, seed, fields, settings in jobs]
    log(f"[study] uptraining: {len(jobs)} runs (continuations of the baselines, and from-scratch comparators)")
    done = runs.many(jobs)
    if any(r is None for r in done) or runs.out_of_time():
        return []  # out of time: the next call resumes the continuations and writes the curve whole
    losses_of = {(name, seed): r["val_loss"] for (name, seed, _, _), r in zip(jobs, done, strict=True)}
    name_of = {cell: job[0] for cell, job in zip([c for c in trained for _ in suite.seeds], jobs, strict=True)}
    rows: list[dict] = []
    for cell in plan:
        method, n_kv, fraction, steps = cell
        if cell in name_of:
            losses = [losses_of[(name_of[cell], s)] for s in suite.seeds]
        elif method == "control":
            losses = [base_losses[s] for s in suite.seeds]  # the baseline itself
        else:  # the conversion alone, before any training
            dirs = [base_dirs[s] for s in suite.seeds]
            try:
                losses = runs.isolated(converted_losses, dirs, n_kv, method, data_dir, context, max_tokens)
            except OutOfTime:
                return []
        for seed, loss in zip(suite.seeds, losses, strict=True):
            rows.append({"method": method, "n_kv_head": n_kv or "", "fraction": fraction, "steps": steps,
                         "seed": seed, "val_loss": loss})  # fmt: skip
    return rows


def uptrain_pairs(rows: list[dict]) -> list[dict]:
    """Each converted cell's paired difference to the control at the same fraction (same seeds) and, at the
    fraction with a from-scratch comparator, to that comparator (same K/V heads, same total steps)."""
    by_cell: dict[tuple, dict[int, float]] = {}
    for r in rows:
        by_cell.setdefault((r["method"], r["n_kv_head"], r["fraction"], r["steps"]), {})[r["seed"]] = r["val_loss"]
    control = {fraction: losses for (method, _, fraction, _), losses in by_cell.items() if method == "control"}
    scratch = {(n_kv, fraction): ls for (method, n_kv, fraction, _), ls in by_cell.items() if method == "scratch"}
    out = []
    for (method, n_kv, fraction, steps), mine in by_cell.items():
        if method in ("control", "scratch"):
            continue
        versus = [("continued MHA", control.get(fraction))]
        if method == "mean":
            versus.append(("from scratch, same total steps", scratch.get((n_kv, fraction))))
        for label, reference in versus:
            if reference:
                out.append({"method": method, "n_kv_head": n_kv, "fraction": fraction, "steps": steps,
                            "versus": label, "val_loss": float(np.mean(list(mine.values()))),
                            **paired_difference(mine, reference)})  # fmt: skip
    return out
