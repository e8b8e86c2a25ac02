"""``report.md`` of a variant study. Every number in it is read back from the CSVs the study wrote (and
the benchmark CSV it cites), so text and data cannot disagree; a difference is only called one when its
95% interval excludes zero."""

from __future__ import annotations

import shlex
import statistics
from pathlib import Path

from gpt2lab.files import write_text
from gpt2lab.outputs import REPORT_FILE
from gpt2lab.study.sections import (
    PAIRED_HEADER,
    comparison_cells,
    context_use_section,
    extrapolation_section,
    holm_cells,
    num,
    probe_section,
    table,
    uptrain_section,
)
from gpt2lab.study.suite import VARIANT_KEYS, Suite, read_csv

RESULT_COLUMNS = [  # (results.csv column, title, format)
    ("variant", "variant", "{}"),
    ("pos_encoding", "positions", "{}"),
    ("n_kv_head", "K/V heads", "{:.0f}"),
    ("window", "window", "{:.0f}"),
    ("reach", "reach", "{:.0f}"),
    ("params", "params", "{:,.0f}"),
    ("kv_kib_at_ctx", "KV KiB @ctx", "{:,.0f}"),
    ("flops_per_token", "fwd FLOPs/token", "{:,.0f}"),
    ("step_ms", "ms/step", "{:,.1f}"),
    ("peak_mib", "peak MiB", "{:,.0f}"),
    ("effective_context", "effective context", "{:.0f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_loss_sd", "± sd", "{:.4f}"),
    ("loss_first", "loss, first positions", "{:.3f}"),
    ("loss_late", "loss, second half", "{:.3f}"),
]

HOLM_HEADER = ["unpaired 95% interval", "seed correlation r", "p (paired t)", "p, Holm", "significant after Holm"]


def comparisons_section(out: Path, suite: Suite) -> list[str]:
    path = out / "comparisons.csv"
    if not path.is_file():
        return []
    rows = read_csv(path)
    limits = [float(r["detection_limit"]) for r in rows if r["detection_limit"] != ""]
    n = len(suite.seeds)
    text = [
        "## Paired differences",
        "",
        f"Each variant minus its reference, seed by seed (same data order, same evaluation tokens), over {n} "
        f"seeds; the interval is mean ± t(0.975, {n - 1}) · sd/√{n}. A variant is called lower or higher only "
        "when its interval excludes zero. The detection limit is the true difference this design would find "
        "with 80 % power given the observed paired spread, (t(0.975) + t(0.8)) · sd/√n: smaller differences "
        "can exist unseen.",
        "",
        *table(
            ["variant", "reference", *PAIRED_HEADER, *HOLM_HEADER],
            [[r["variant"], r["reference"], *comparison_cells(r), *holm_cells(r)] for r in rows],
        ),
        "",
        f"Holm's step-down correction is applied across these {len(rows)} comparisons (family-wise error 5 %); "
        "only the last column's 'True' survive it. The unpaired interval ignores the seed matching; pairing "
        "narrows the interval only where r > 0.",
        "",
    ]
    if limits:
        text += [
            f"Across comparisons the detection limit runs from {min(limits):.4f} to {max(limits):.4f} nats "
            f"(median {statistics.median(limits):.4f}).",
            "",
        ]
    return text + ["![paired differences](comparisons.png) ![quality vs KV cache](quality_vs_kv.png)", ""]


def cost_section(out: Path, suite: Suite, rows: list[dict[str, str]], context: int) -> list[str]:
    text = ["## Costs", ""]
    kv = ", ".join(f"{r['variant']} {num(r['kv_kib_at_ctx'], '{:,.0f}')} KiB" for r in rows)
    text += [f"KV cache of one sequence at the trained context ({context} tokens, fp32, from results.csv): {kv}.", ""]
    path = Path(suite.cost["benchmarks"])
    if not path.is_file():
        return text + [
            f"Speed at the GPT-2 124M shape: no benchmark CSV at `{path}`. Run `python benchmarks/attention.py`, "
            "record its figures there (columns measure, variant, length, value, unit, machine, recorded, source) "
            "and re-run `gpt2lab study` to fill this table.",
            "",
        ]
    bench = read_csv(path)
    body = [[b["measure"], b["variant"], b["length"], f"{b['value']} {b['unit']}"] for b in bench]
    machines = sorted({f"{b['machine']} ({b['recorded']}, {b['source']})" for b in bench})
    return text + [
        "At the GPT-2 124M shape (12 layers, 12 heads of 64), from the benchmarks, not from this study's runs: "
        + "; ".join(machines)
        + ". Measured on a CPU: the ratios carry over to other machines better than the absolute figures.",
        "",
        *table(["measure", "variant", "T or context", "value"], body),
        "",
    ]


def can_and_cannot(out: Path, suite: Suite, context: int) -> list[str]:
    n = len(suite.seeds)
    rows = read_csv(out / "results.csv")
    refs = {r["model"]: float(r["val_loss"]) for r in read_csv(out / "references.csv")}
    beats = float(rows[0]["val_loss"]) < min(refs.values())
    quality = (
        "- The reference beats every count model, so differences are about models that have learned more than "
        "n-gram statistics; they are still differences at this budget, not at convergence."
        if beats
        else "- The reference does not beat the best count model (first paragraph): every difference here is "
        "convergence speed at this budget, not final quality; a variant that is behind may catch up."
    )
    return [
        "## What this study can and cannot show",
        "",
        f"- It can show differences larger than its detection limits between small models ({suite.model}) "
        f"trained briefly on one corpus with {n} seeds each, after Holm's correction across the comparisons; it "
        "cannot rank variants whose intervals include zero, and a difference it does not detect may still exist.",
        quality,
        "- It measures the variants at one small scale and one budget. Published claims (RoFormer, GQA, "
        "Longformer, Mistral) concern models and budgets orders of magnitude larger; agreement or disagreement "
        "here is evidence about this regime only.",
        "- A window can only matter where its reach is below what the models use (the effective context); the "
        "receptive-field probe shows what each shape can learn on a synthetic task, not what text needs.",
        f"- Extrapolation covers 4x the trained context ({4 * context} tokens) on held-out Shakespeare only.",
        "- Step times and memory are measured on the machine that ran the study, possibly shared: compare them "
        "within this report; accelerators change absolute figures and possibly the ranking of kernels.",
        "",
    ]


def results_table(rows: list[dict[str, str]]) -> list[str]:
    return table([t for _, t, _ in RESULT_COLUMNS], [[num(r[c], p) for c, _, p in RESULT_COLUMNS] for r in rows])


def verdict_against_ngram(out: Path, rows: list[dict[str, str]]) -> list[str]:
    """The report's first paragraph: does the reference beat the best count model, and by how much."""
    refs = {r["model"]: float(r["val_loss"]) for r in read_csv(out / "references.csv")}
    best = min(refs, key=refs.get)
    base = float(rows[0]["val_loss"])
    gap = base - refs[best]
    if gap < 0:
        text = (
            f"**The reference beats the best count model**: {base:.4f} against the {best}'s {refs[best]:.4f} "
            f"nats/token ({-gap:.4f} lower), on the same tokens and windows."
        )
    else:
        text = (
            f"**The reference does NOT beat the best count model**: it ends at {base:.4f} nats/token, "
            f"{gap:.4f} above the {best}'s {refs[best]:.4f} on the same tokens and windows. Differences between "
            "variants here describe models that have not yet learned what a 5-gram table knows: read them as "
            "convergence speed at this budget, not as final quality."
        )
    return [text, ""]


def missing_runs(out: Path) -> list[str]:
    path = out / "missing.txt"
    names = path.read_text().split("\n") if path.is_file() else []
    names = [n for n in names if n]
    if not names:
        return []
    return [
        "## Missing runs",
        "",
        f"This report is built from the runs present; {len(names)} did not finish in this call (re-run the same "
        "command to resume them): " + ", ".join(f"`{n}`" for n in names) + ".",
        "",
    ]


def write_report(out: Path, suite: Suite, context: int) -> Path:
    rows = read_csv(out / "results.csv")
    lines = [f"# Variant study: {suite.name}", "", *verdict_against_ngram(out, rows), *missing_runs(out)]
    lines += _header(out, suite, context, rows)[2:]
    lines += ["## Results", "", *results_table(rows), "", *_references_and_context(out, suite, rows), ""]
    lines += ["![validation loss](loss_curves.png)", "![loss by position](loss_by_position.png)", ""]
    lines += context_use_section(out, rows)
    lines += comparisons_section(out, suite)
    lines += probe_section(out)
    lines += extrapolation_section(out, context)
    lines += uptrain_section(out, suite)
    lines += cost_section(out, suite, rows, context)
    lines += can_and_cannot(out, suite, context)
    path = out / REPORT_FILE
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
        "Count-model references on the same tokens and windows (interpolated Witten-Bell n-grams counted on the "
        "train split; position p of a window uses at most its p + 1 tokens, like the models): "
        + ", ".join(f"{k} {num(v)}" for k, v in refs.items())
        + f" nats/token; the baseline ends at {num(base['val_loss'])}.",
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
