"""``report.md`` of a variant study. Every number in it is read back from the CSVs the study wrote (and
the benchmark CSV it cites), so text and data cannot disagree; a difference is only called one when its
95% interval excludes zero."""

from __future__ import annotations

import shlex
from pathlib import Path

from .files import write_text
from .study_report_sections import (
    can_and_cannot,
    comparisons_section,
    cost_section,
    extrapolation_section,
    num,
    probe_section,
    table,
    uptrain_section,
)
from .study_suite import VARIANT_KEYS, Suite, read_csv

RESULT_COLUMNS = [  # (results.csv column, title, format)
    ("variant", "variant", "{}"),
    ("pos_encoding", "positions", "{}"),
    ("n_kv_head", "K/V heads", "{:.0f}"),
    ("window", "window", "{:.0f}"),
    ("reach", "reach", "{:.0f}"),
    ("params", "params", "{:,.0f}"),
    ("kv_kib_at_ctx", "KV KiB @ctx", "{:,.0f}"),
    ("train_tok_s", "train tok/s", "{:,.0f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_loss_sd", "± sd", "{:.4f}"),
    ("loss_first", "loss, first positions", "{:.3f}"),
    ("loss_late", "loss, second half", "{:.3f}"),
]


def results_table(rows: list[dict[str, str]]) -> list[str]:
    return table([t for _, t, _ in RESULT_COLUMNS], [[num(r[c], p) for c, _, p in RESULT_COLUMNS] for r in rows])


def write_report(out: Path, suite: Suite, context: int) -> Path:
    rows = read_csv(out / "results.csv")
    lines = _header(out, suite, context, rows)
    lines += ["## Results", "", *results_table(rows), "", *_references_and_context(out, suite, rows), ""]
    lines += ["![validation loss](loss_curves.png)", "![loss by position](loss_by_position.png)", ""]
    lines += comparisons_section(out, suite)
    lines += probe_section(out)
    lines += extrapolation_section(out, context)
    lines += uptrain_section(out, suite)
    lines += cost_section(out, suite, rows, context)
    lines += can_and_cannot(out, suite, context)
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _header(out: Path, suite: Suite, context: int, rows: list[dict[str, str]]) -> list[str]:
    train = suite.train
    per_step = int(train.get("batch_size", 8)) * int(train.get("grad_accum", 1))
    tokens = int(train["max_iters"]) * per_step * context
    same = len({r["eval_sha"] for r in rows}) == 1
    tokenizer = "characters (one token per character)" if suite.tokenizer == "char" else "GPT-2 BPE"
    return [
        f"# Variant study: {suite.name}",
        "",
        "Reproduce with:",
        "",
        "```bash",
        f"gpt2lab study --suite {suite.source} --data {suite.data} --out {out}"
        + "".join(f" --set {shlex.quote(item)}" for item in suite.overrides),
        "```",
        "",
        f"The reference variant `{suite.variants[0]['name']}` has the model {suite.model}"
        + _changes(suite)
        + f" Every variant trains for {train['max_iters']} steps of {per_step} × "
        f"{context} tokens ({tokens:,} tokens) with the same optimizer, schedule and seeds {suite.seeds}; a seed "
        f"fixes the data order, the same for every variant. Data: `{suite.data}` as {tokenizer}, the last 10 % "
        f"held out. Every run is scored on the same {rows[0]['eval_tokens']} held-out tokens "
        f"(sha256 {rows[0]['eval_sha']}"
        + (", identical for all variants" if same else "; NOT identical for all variants: see results.csv")
        + f") in non-overlapping windows of {context}, so position p has seen p earlier tokens. ± sd is the "
        "spread over seeds. reach = Σ(W − 1) over layers: the furthest distance a token can carry to a query "
        "through stacked windows (full: unlimited). Training tokens/s are from a shared 2-core CPU: compare "
        "them within this table only.",
        "",
    ]


def _changes(suite: Suite) -> str:
    """What each variant sets over the shared model, as the suite file says it."""
    changes = [
        f"`{v['name']}` " + (", ".join(f"{k} = {val}" for k, val in v.items() if k not in VARIANT_KEYS) or "nothing")
        for v in suite.variants[1:]
    ]
    return "; over that model the other variants set " + "; ".join(changes) + "." if changes else "."


def _references_and_context(out: Path, suite: Suite, rows: list[dict[str, str]]) -> list[str]:
    refs = {r["model"]: r["val_loss"] for r in read_csv(out / "references.csv")}
    base = rows[0]
    gain = _context_gain(base)
    early = suite.eval["early_positions"]
    return [
        f"Reference lines on the same tokens: a unigram count model scores {num(refs['unigram'])} and an "
        f"interpolated bigram count model {num(refs['bigram'])} nats/token; the baseline ends at "
        f"{num(base['val_loss'])}.",
        "",
        f"Does the baseline use its context? Its loss on the first {early} positions is {num(base['loss_first'])} "
        f"and on the second half of the window {num(base['loss_late'])}, a gain of {gain:.3f} nats from context: "
        + (
            "at least the 0.3 this study needs to tell position encodings and windows apart."
            if gain >= 0.3
            else "LESS than the 0.3 this study needs, so comparisons with the baseline say little about how "
            "the variants use long context."
        )
        + _other_gains(rows[1:]),
    ]


def _context_gain(row: dict[str, str]) -> float:
    """How much lower a variant's loss is late in the window than on its first positions (nats)."""
    return float(row["loss_first"]) - float(row["loss_late"])


def _other_gains(rows: list[dict[str, str]]) -> str:
    gains = {r["variant"]: _context_gain(r) for r in rows}
    if not gains:
        return ""
    return " The same gain for the other variants: " + ", ".join(f"{v} {g:.3f}" for v, g in gains.items()) + "."
