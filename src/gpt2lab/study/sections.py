"""The sections of a study's ``report.md`` that each read one CSV of the study (context use, probe,
extrapolation, uptraining), and the table helpers every section shares."""

from __future__ import annotations

import statistics
from pathlib import Path

from gpt2lab.study.probe import KEYS
from gpt2lab.study.suite import Suite, read_csv

PAIRED_HEADER = ["Δ loss (mean)", "95% interval", "detection limit", "verdict"]


def num(value: str, pattern: str = "{:.3f}") -> str:
    """A CSV cell as the report prints it (blank cells print as 'n/a', words as they are)."""
    if value == "":
        return "n/a"
    try:
        return pattern.format(float(value))
    except ValueError:
        return value


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def figure_section(title: str, intro: str, table_lines: list[str], figure: str, alt: str) -> list[str]:
    """A report section laid out as each of them is: heading, what was measured, the table, the figure."""
    return [f"## {title}", "", intro, "", *table_lines, "", f"![{alt}]({figure})", ""]


def comparison_cells(row: dict[str, str]) -> list[str]:
    interval = "n/a" if row["low"] == "" else f"[{num(row['low'], '{:+.4f}')}, {num(row['high'], '{:+.4f}')}]"
    return [num(row["mean_diff"], "{:+.4f}"), interval, num(row["detection_limit"], "{:.4f}"), row["verdict"]]


def holm_cells(row: dict[str, str]) -> list[str]:
    unpaired = row.get("unpaired_low", "")
    interval = "n/a" if unpaired == "" else f"[{num(unpaired, '{:+.4f}')}, {num(row['unpaired_high'], '{:+.4f}')}]"
    return [
        interval,
        num(row.get("seed_correlation", ""), "{:+.2f}"),
        num(row.get("p_value", ""), "{:.4f}"),
        num(row.get("p_holm", ""), "{:.4f}"),
        row.get("holm_significant", "") or "n/a",
    ]


def context_use_section(out: Path, rows: list[dict[str, str]]) -> list[str]:
    path = out / "context_use.csv"
    if not path.is_file():
        return []
    cuts = read_csv(path)
    lengths = list(dict.fromkeys(r["context"] for r in cuts))
    cells = {(r["variant"], r["context"]): r["cost"] for r in cuts}
    body = [
        [v, *[num(cells.get((v, c), ""), "{:+.3f}") for c in lengths]]
        for v in dict.fromkeys(r["variant"] for r in cuts)
    ]
    effective = ", ".join(f"{r['variant']} {num(r.get('effective_context', ''), '{:.0f}')}" for r in rows)
    intro = (
        "Loss when the model may read only the last c tokens, minus its loss with the full context, on the same "
        "sampled held-out targets (each with a full context behind it), mean over seeds. The effective context "
        "is the smallest measured c from which every longer cut costs less than 0.01 nats (each run's, mean over "
        "seeds): "
        f"{effective}. A window whose reach is below the reference's effective context binds what the "
        "reference uses; one above it does not."
    )
    return figure_section("Context use", intro, table(["variant", *[f"c={c}" for c in lengths]], body),
                          "context_use.png", "context use")  # fmt: skip


def probe_section(out: Path) -> list[str]:
    path = out / "probe.csv"
    if not path.is_file():
        return []
    rows = read_csv(path)

    def mean_acc(variant: str, distance: int) -> str:
        got = [float(r["accuracy"]) for r in rows if r["variant"] == variant and int(r["distance"]) == distance]
        return f"{statistics.fmean(got):.2f}" if got else "n/a"

    body = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        reach = mine[0]["reach"]
        visible_ok = all((r["key_visible"] == "True") == (r["within_reach"] == "True") for r in mine)
        distances = sorted({int(r["distance"]) for r in mine})
        at = [d for d in distances if reach == "full" or d <= int(reach)]
        past = [d for d in distances if reach != "full" and d > int(reach)]
        body.append(
            [
                name,
                reach,
                f"{mean_acc(name, at[-1])} (d={at[-1]})" if at else "n/a",
                f"{mean_acc(name, past[0])} (d={past[0]})" if past else "n/a",
                "yes" if visible_ok else "NO",
            ]
        )
    header = [
        "variant",
        "reach",
        "accuracy at the furthest d within reach",
        "just beyond reach",
        "key visible ⇔ d ≤ reach",
    ]
    intro = (
        "Each variant's shape is trained from scratch on a passkey task: one key symbol at distance d before a "
        f"query marker, filler elsewhere; chance is 1/{KEYS}. The last column checks the window convention exactly "
        "on the trained model: changing the key changes the answer's logits if and only if d ≤ reach."
    )
    return figure_section("Receptive-field probe", intro, table(header, body), "probe.png", "receptive-field probe")


def extrapolation_section(out: Path, context: int) -> list[str]:
    path = out / "extrapolation.csv"
    if not path.is_file():
        return []
    rows = read_csv(path)
    bands = list(dict.fromkeys(r["band"] for r in rows))
    cells = {(r["variant"], r["method"], r["band"]): r["loss"] for r in rows}
    keys = list(dict.fromkeys((r["variant"], r["method"]) for r in rows))
    body = [[v, m, *[num(cells.get((v, m, b), "")) for b in bands]] for v, m in keys]
    intro = (
        f"The same held-out tokens scored in windows of 1x, 2x and 4x the trained context ({context}); "
        "learned positions only at 1x and, as comparator, with a sliding context (each token sees at most "
        f"{context} before it). Mean loss (nats/token) over bands of positions in the window:"
    )
    lines = table(["variant", "method", *[f"positions {b}" for b in bands]], body)
    return figure_section("Length extrapolation", intro, lines, "extrapolation.png", "length extrapolation")


def uptrain_section(out: Path, suite: Suite) -> list[str]:
    path = out / "uptrain_pairs.csv"
    if not path.is_file():
        return []
    rows = read_csv(path)
    total = int(suite.train["max_iters"])
    body = [
        [
            f"{r['method']}-init",
            r["n_kv_head"],
            f"{float(r['fraction']):.1%} ({r['steps']} steps)",
            r.get("versus", "continued MHA"),
            num(r["val_loss"], "{:.4f}"),
            *comparison_cells(r),
        ]  # fmt: skip
        for r in rows
    ]
    intro = (
        f"Each seed's baseline (trained {total} steps) is converted to fewer K/V heads (mean of each group, or "
        "its first head) and trained on from its final training state: weights, AdamW moments (the pooled K/V "
        "heads' moments pooled the same way as their weights), step count and data order, with the learning "
        f"rate held at the schedule's final min_lr{_value(suite.train.get('min_lr'))} (no re-warm-up). "
        "Δ is taken seed by seed "
        "against (a) the unconverted baseline continued the same way (continued MHA) and (b) the converted "
        f"shape trained from scratch for the same total steps ({total} + the uptraining's)."
    ) + _control_jolt(read_csv(out / "uptrain.csv"), suite)
    lines = table(["init", "K/V heads", "uptraining", "versus", "val loss", *PAIRED_HEADER], body)
    return figure_section("Uptraining", intro, lines, "uptrain.png", "uptraining")


def _value(value) -> str:
    return "" if value is None else f" = {value}"


def _control_jolt(rows: list[dict[str, str]], suite: Suite) -> str:
    """A sentence for when the control gets worse before it gets better, which the plot shows unexplained."""
    control: dict[int, list[float]] = {}
    for r in rows:
        if r["method"] == "control":
            control.setdefault(int(r["steps"]), []).append(float(r["val_loss"]))
    steps = sorted(control)
    if len(steps) < 2:
        return ""
    train, before, after = suite.train, statistics.mean(control[steps[0]]), statistics.mean(control[steps[1]])
    if after <= before:
        return ""
    return (
        f" The control's loss first rises, from {before:.3f} to {after:.3f} "
        f"after {steps[1]} steps: every continuation warms up again to the suite's peak learning rate "
        f"({train.get('lr')}), while the baseline had ended its schedule at {train.get('min_lr')}. That shock is "
        "the same on both sides of each Δ, which is why the comparison is with the control, not with the baseline."
    )
