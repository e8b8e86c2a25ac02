"""The variant study's figures. Legends sit outside the axes (never over the data), axes name their
units, and reference lines (unigram, bigram, chance, reach, trained context) are labelled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2lab.plots import plot_file
from gpt2lab.study.probe import KEYS
from gpt2lab.study.suite import Suite, group_by_variant, read_csv

WIDE = (9, 4.5)


def _legend(ax) -> None:
    if not ax.get_legend_handles_labels()[0]:
        return  # nothing labelled (e.g. every comparison had too few seeds for an interval)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _references(ax, out: Path, lowest: int = 3) -> None:
    """The n-gram reference lines from ``lowest``-gram up (the 1- and 2-gram would squeeze the axis)."""
    styles = {3: ("-.", "silver"), 4: (":", "gray"), 5: ("--", "black")}
    for row in read_csv(out / "references.csv"):
        n = int(row["model"].split("-")[0]) if row["model"].split("-")[0].isdigit() else 0
        if n >= lowest:
            style, color = styles.get(n, ("--", "black"))
            ax.axhline(float(row["val_loss"]), color=color, ls=style, lw=1, label=f"{row['model']} (count model)")


def _smooth(curve: np.ndarray, width: int = 8, exact: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positions, values): the first ``exact`` positions as they are, then a moving average over
    ``width`` positions, each point at its window's centre."""
    values = np.convolve(curve, np.ones(width) / width, mode="valid")
    centres = np.arange(len(values)) + (width - 1) / 2
    keep = centres >= exact
    return np.concatenate([np.arange(exact), centres[keep]]), np.concatenate([curve[:exact], values[keep]])


def write_plots(out: Path, suite: Suite, results: list[dict], context: int) -> None:
    _plot_loss_curves(out, results)
    _plot_loss_by_position(out, read_csv(out / "results.csv"), results, context)
    if (out / "comparisons.csv").is_file():
        _plot_quality_vs_kv(out / "quality_vs_kv.png", read_csv(out / "results.csv"), read_csv(out / "comparisons.csv"))
    if (out / "context_use.csv").is_file():
        _plot_context_use(out / "context_use.png", read_csv(out / "context_use.csv"), context)
    if (out / "comparisons.csv").is_file():
        _plot_comparisons(out / "comparisons.png", read_csv(out / "comparisons.csv"))
    if (out / "probe.csv").is_file():
        _plot_probe(out / "probe.png", read_csv(out / "probe.csv"))
    if any(r.get("extrapolation") for r in results):
        _plot_extrapolation(out / "extrapolation.png", results, context)
    if (out / "uptrain.csv").is_file():
        _plot_uptrain(out / "uptrain.png", read_csv(out / "uptrain.csv"), suite)


def _plot_loss_curves(out: Path, results: list[dict]) -> None:
    with plot_file(out / "loss_curves.png", size=WIDE, dpi=110) as (ax,):
        for i, (name, curves) in enumerate(group_by_variant(results, "val_curve").items()):
            steps = [s for s, _ in curves[0]]
            same = np.array([[v for _, v in c] for c in curves if [s for s, _ in c] == steps])
            ax.plot(steps, same.mean(axis=0), marker=".", color=f"C{i}", label=f"{name} (mean of {len(same)} seeds)")
            ax.fill_between(steps, same.min(axis=0), same.max(axis=0), color=f"C{i}", alpha=0.2, lw=0)
        _references(ax, out)
        ax.text(0.01, 0.06, "band: lowest to highest seed", transform=ax.transAxes, fontsize=7)
        ax.set(xlabel="training step", ylabel="validation loss (nats/token)", title="Validation loss during training")
        ax.text(0.01, 0.01, "estimate from the trainer's eval_iters batches", transform=ax.transAxes, fontsize=7)
        _legend(ax)


def _plot_loss_by_position(out: Path, rows: list[dict], results: list[dict], context: int) -> None:
    with plot_file(out / "loss_by_position.png", size=WIDE, dpi=110) as (ax,):
        for name, curves in group_by_variant(results, "by_position").items():
            positions, values = _smooth(np.mean(curves, axis=0), exact=8)
            ax.plot(positions + 1, values, lw=1.2, marker=".", markevery=list(range(8)), label=name)
        for row in rows:  # position p has seen p + 1 tokens; a token reach r back is the (r + 1)-th seen
            if row["reach"] != "full" and int(row["reach"]) < context:
                ax.axvline(int(row["reach"]) + 1, ls=":", color="gray", lw=1)
        ax.set_xscale("log")
        ax.set(
            xlabel="tokens seen = position + 1 (log scale; dotted: windowed reach + 1)",
            ylabel="loss (nats/token; positions 0-7 exact, then 8-position mean)",
            title=f"Loss by position, trained context {context} (mean over seeds)",
        )
        _legend(ax)


def _plot_quality_vs_kv(path: Path, rows: list[dict], comparisons: list[dict]) -> None:
    """Each variant's paired difference to its reference (95% interval) against its KV-cache size."""
    kib = {r["variant"]: float(r["kv_kib_at_ctx"]) for r in rows}
    with plot_file(path, size=(8, 4.5), dpi=110) as (ax,):
        for i, row in enumerate(r for r in comparisons if r["variant"] in kib and r["low"] != ""):
            mean, low, high = float(row["mean_diff"]), float(row["low"]), float(row["high"])
            x = kib[row["variant"]] * (1 + 0.04 * (i % 3 - 1))  # variants of one cache size side by side
            ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="o", capsize=3, color=f"C{i}",
                        label=f"{row['variant']} − {row['reference']}")  # fmt: skip
        ax.axhline(0, color="gray", lw=1)
        ax.set(
            xlabel="KV cache of one sequence at the trained context (KiB, fp32, log scale)",
            ylabel="paired Δ loss to its reference (nats/token; bar: 95% interval)",
            title="Quality against KV-cache size (paired differences)",
            xscale="log",
        )
        _legend(ax)


def _plot_comparisons(path: Path, rows: list[dict]) -> None:
    """Paired intervals; the axis is set by the typical rows, and a row beyond it is drawn at the edge with
    an arrow and its value, so one large difference cannot squeeze the others."""
    tested = [r for r in rows if r["low"] != ""]
    bounds = sorted(max(abs(float(r["low"])), abs(float(r["high"]))) for r in tested) or [1.0]
    limit = 1.15 * min(bounds[-1], 3 * bounds[len(bounds) // 2])
    with plot_file(path, size=(8, 0.6 * len(rows) + 1.8), dpi=110) as (ax,):
        for i, row in enumerate(rows):
            if row["low"] == "":
                continue
            mean, low, high = float(row["mean_diff"]), float(row["low"]), float(row["high"])
            color = "C0" if row.get("holm_significant") != "True" else "C2"
            if abs(mean) > limit:
                edge = np.sign(mean) * limit * 0.97
                ax.annotate(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (off the scale)", (edge, i),
                            ha="right" if mean > 0 else "left", va="bottom", fontsize=8, color=color)  # fmt: skip
                ax.plot(edge, i, marker=">" if mean > 0 else "<", color=color)
                continue
            ax.errorbar(mean, i, xerr=[[mean - low], [high - mean]], fmt="o", capsize=4, color=color)
        ax.axvline(0, color="gray", lw=1)
        ax.set_xlim(-limit, limit)
        ax.set_yticks(range(len(rows)), [f"{r['variant']} − {r['reference']}" for r in rows])
        ax.invert_yaxis()
        ax.set(
            xlabel="paired Δ loss (nats/token), mean and t 95% interval; green: significant after Holm",
            title="Differences",
        )


def _plot_context_use(path: Path, rows: list[dict], context: int) -> None:
    with plot_file(path, size=WIDE, dpi=110) as (ax,):
        for i, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            mine = [r for r in rows if r["variant"] == name]
            ax.plot([int(r["context"]) for r in mine], [float(r["cost"]) for r in mine], marker="o", ms=3,
                    color=f"C{i}", label=name)  # fmt: skip
        ax.axhline(0.01, color="gray", ls="--", lw=1, label="0.01 nats (effective-context threshold)")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set(
            xlabel=f"tokens of context the model may read (log scale; full = {context})",
            ylabel="loss(c) − loss(full context) (nats/token)",
            title="Context use: the cost of cutting the context",
        )
        _legend(ax)


def _plot_probe(path: Path, rows: list[dict]) -> None:
    with plot_file(path, size=WIDE, dpi=110) as (ax,):
        for i, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            mine = [r for r in rows if r["variant"] == name]
            distances = sorted({int(r["distance"]) for r in mine})
            acc = [np.mean([float(r["accuracy"]) for r in mine if int(r["distance"]) == d]) for d in distances]
            # variants that solve every distance draw the same line: hollow markers, nudged apart, keep each visible
            nudged = [d * (1 + 0.05 * (i - 1.5)) for d in distances]
            style = dict(marker="osD^v"[i % 5], ms=7, mfc="none", mew=1.5, ls=("-", "--", "-.", ":")[i % 4])
            ax.plot(nudged, acc, color=f"C{i}", label=f"{name} (reach {mine[0]['reach']})", **style)
            if mine[0]["reach"] != "full":
                ax.axvline(int(mine[0]["reach"]) + 0.5, color=f"C{i}", ls=":", lw=1)
        ax.axhline(1 / KEYS, color="gray", ls="--", lw=1, label=f"chance (1/{KEYS})")
        ax.set_xscale("log")
        ax.set(
            xlabel="distance from key to query (tokens, log scale; dotted: reach + ½)",
            ylabel="passkey accuracy",
            ylim=(0, 1.08),
            title="Receptive-field probe",
        )
        _legend(ax)


def _plot_extrapolation(path: Path, results: list[dict], context: int) -> None:
    grouped = group_by_variant([r for r in results if r.get("extrapolation")], "extrapolation")
    with plot_file(path, size=(9, 5.5), dpi=110) as (ax,):
        for i, (name, curves) in enumerate(grouped.items()):
            # one line per variant: 4x windows where the positions allow it (RoPE), else the sliding comparator
            method = "4x" if "4x" in curves[0] else "sliding-4x"
            mean = np.mean([c[method] for c in curves], axis=0)
            ax.plot(*_smooth(mean, 16), lw=1.1, ls="-" if method == "4x" else "--", color=f"C{i}",
                    label=f"{name}" + (" (sliding context)" if method != "4x" else ""))  # fmt: skip
        if "baseline" in grouped:
            at_1x = float(np.mean([np.mean(c["1x"]) for c in grouped["baseline"]]))
            ax.axhline(at_1x, color="black", ls=":", lw=1, label=f"baseline at its trained context ({at_1x:.3f})")
        for k in (1, 2):
            ax.axvline(k * context, color="gray", ls=":", lw=1)
        ax.set(
            xlabel=f"position (tokens; dotted verticals: 1x and 2x the trained context {context})",
            ylabel="loss (nats/token, 16-position mean)",
            title="Length extrapolation: windows of 4x the trained context",
        )
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)


def _plot_uptrain(path: Path, rows: list[dict], suite: Suite) -> None:
    total = int(suite.train["max_iters"])
    with plot_file(path, size=WIDE, dpi=110) as (ax,):
        cells = dict.fromkeys((r["method"], r["n_kv_head"]) for r in rows if r["method"] != "scratch")
        scratch_rows = [r for r in rows if r["method"] == "scratch"]
        for i, (method, n_kv) in enumerate(cells):
            mine = [r for r in rows if (r["method"], r["n_kv_head"]) == (method, n_kv)]
            steps = sorted({int(r["steps"]) for r in mine})
            per_step = [[float(r["val_loss"]) for r in mine if int(r["steps"]) == s] for s in steps]
            sd = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_step]
            label = "control: baseline continued" if method == "control" else f"{method}-init, {n_kv} K/V heads"
            x = [100 * s / total + 0.3 * i for s in steps]  # nudged so the error bars do not overlap
            ax.errorbar(x, [np.mean(v) for v in per_step], yerr=sd, marker="o", capsize=3, color=f"C{i}", label=label)
            scratch = [float(r["val_loss"]) for r in scratch_rows if r["n_kv_head"] == n_kv and method == "mean"]
            if scratch:  # the same shape from scratch for the same total steps: a line at its mean, band ± sd
                mean, sd = float(np.mean(scratch)), float(np.std(scratch, ddof=1)) if len(scratch) > 1 else 0.0
                steps_total = total + max(int(r["steps"]) for r in scratch_rows)
                ax.axhline(
                    mean, color=f"C{i}", ls="--", lw=1, label=f"{n_kv} K/V heads from scratch, {steps_total} steps"
                )
                ax.axhspan(mean - sd, mean + sd, color=f"C{i}", alpha=0.1, lw=0)
        ax.set(
            xlabel=f"uptraining steps (% of the baseline's {total} pre-training steps)",
            ylabel="validation loss (nats/token; bar: ± sd over seeds)",
            title="Uptraining from the multi-head baseline",
        )
        _legend(ax)
