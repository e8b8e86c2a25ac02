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
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _references(ax, out: Path) -> None:
    styles = {"unigram": ":", "bigram": "--"}
    for row in read_csv(out / "references.csv"):
        ax.axhline(float(row["val_loss"]), color="gray", ls=styles.get(row["model"], "-."), lw=1, label=row["model"])


def _smooth(curve: np.ndarray, width: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(positions, moving average over ``width`` positions), each point at its window's centre."""
    values = np.convolve(curve, np.ones(width) / width, mode="valid")
    return np.arange(len(values)) + (width - 1) / 2, values


def write_plots(out: Path, suite: Suite, results: list[dict], context: int) -> None:
    _plot_loss_curves(out, results)
    _plot_loss_by_position(out, read_csv(out / "results.csv"), results, context)
    _plot_quality_vs_kv(out / "quality_vs_kv.png", read_csv(out / "results.csv"), context)
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
        for name, curves in group_by_variant(results, "val_curve").items():
            steps = [s for s, _ in curves[0]]
            same = [[v for _, v in c] for c in curves if [s for s, _ in c] == steps]
            ax.plot(steps, np.mean(same, axis=0), marker=".", label=f"{name} (mean of {len(same)} seeds)")
        _references(ax, out)
        ax.set(xlabel="training step", ylabel="validation loss (nats/token)", title="Validation loss during training")
        ax.text(0.01, 0.01, "estimate from the trainer's eval_iters batches", transform=ax.transAxes, fontsize=7)
        _legend(ax)


def _plot_loss_by_position(out: Path, rows: list[dict], results: list[dict], context: int) -> None:
    with plot_file(out / "loss_by_position.png", size=WIDE, dpi=110) as (ax,):
        for name, curves in group_by_variant(results, "by_position").items():
            ax.plot(*_smooth(np.mean(curves, axis=0)), lw=1.2, label=name)
        for row in rows:
            if row["reach"] != "full" and int(row["reach"]) < context:
                ax.axvline(int(row["reach"]), ls=":", color="gray", lw=1)
        ax.set_xscale("log")
        ax.set(
            xlabel="position in the context (log scale; dotted: windowed reach)",
            ylabel="loss (nats/token, 8-position mean)",
            title=f"Loss by position, trained context {context} (mean over seeds)",
        )
        _legend(ax)


def _plot_quality_vs_kv(path: Path, rows: list[dict], context: int) -> None:
    with plot_file(path, size=(8, 4.5), dpi=110) as (ax,):
        for row in rows:
            sd = float(row["val_loss_sd"]) if row["val_loss_sd"] else 0.0
            ax.errorbar(
                float(row["kv_kib_at_ctx"]), float(row["val_loss"]), yerr=sd, fmt="o", capsize=3, label=row["variant"]
            )
        ax.set(
            xlabel=f"KV cache of one sequence at the trained context, {context} tokens (KiB, fp32)",
            ylabel="validation loss (nats/token; bar: ± sd over seeds)",
            title="Quality against KV-cache size",
            xscale="log",
        )
        _legend(ax)


def _plot_comparisons(path: Path, rows: list[dict]) -> None:
    with plot_file(path, size=(8, 0.6 * len(rows) + 1.8), dpi=110) as (ax,):
        for i, row in enumerate(rows):
            if row["low"] == "":
                continue
            mean, low, high = float(row["mean_diff"]), float(row["low"]), float(row["high"])
            ax.errorbar(mean, i, xerr=[[mean - low], [high - mean]], fmt="o", capsize=4, color="C0")
        ax.axvline(0, color="gray", lw=1)
        ax.set_yticks(range(len(rows)), [f"{r['variant']} − {r['reference']}" for r in rows])
        ax.invert_yaxis()
        ax.set(
            xlabel="paired loss difference (nats/token), mean and t-based 95% interval over seeds", title="Differences"
        )


def _plot_probe(path: Path, rows: list[dict]) -> None:
    with plot_file(path, size=WIDE, dpi=110) as (ax,):
        for i, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            mine = [r for r in rows if r["variant"] == name]
            distances = sorted({int(r["distance"]) for r in mine})
            acc = [np.mean([float(r["accuracy"]) for r in mine if int(r["distance"]) == d]) for d in distances]
            # variants that solve every distance draw the same line: shrinking markers keep each one visible
            marker = dict(marker="osD^v"[i % 5], ms=max(3.0, 10 - 2 * i), ls=("-", "--", "-.", ":")[i % 4])
            ax.plot(distances, acc, color=f"C{i}", label=f"{name} (reach {mine[0]['reach']})", **marker)
            if mine[0]["reach"] != "full":
                ax.axvline(int(mine[0]["reach"]) + 0.5, color=f"C{i}", ls=":", lw=1)
        ax.axhline(1 / KEYS, color="gray", ls="--", lw=1, label=f"chance (1/{KEYS})")
        ax.set_xscale("log")
        ax.set(
            xlabel="distance from key to query (tokens, log scale; dotted: reach + ½)",
            ylabel="passkey accuracy",
            ylim=(0, 1.05),
            title="Receptive-field probe",
        )
        _legend(ax)


def _plot_extrapolation(path: Path, results: list[dict], context: int) -> None:
    with plot_file(path, size=WIDE, dpi=110) as (ax,):
        for i, (name, curves) in enumerate(
            group_by_variant([r for r in results if r.get("extrapolation")], "extrapolation").items()
        ):
            for method, style in (("4x", "-"), ("sliding-4x", "--")):
                if method in curves[0]:  # learned positions have the sliding comparator only
                    mean = np.mean([c[method] for c in curves], axis=0)
                    ax.plot(*_smooth(mean, 16), lw=1.1, ls=style, color=f"C{i}", label=f"{name}, {method}")
        for k in (1, 2):
            ax.axvline(k * context, color="gray", ls=":", lw=1)
        ax.set(
            xlabel=f"position (tokens; dotted: 1x and 2x the trained context {context})",
            ylabel="loss (nats/token, 16-position mean)",
            title="Length extrapolation: 4x-context windows (dashed: sliding context)",
        )
        _legend(ax)


def _plot_uptrain(path: Path, rows: list[dict], suite: Suite) -> None:
    total = int(suite.train["max_iters"])
    with plot_file(path, size=WIDE, dpi=110) as (ax,):
        cells = dict.fromkeys((r["method"], r["n_kv_head"]) for r in rows)
        for method, n_kv in cells:
            mine = [r for r in rows if (r["method"], r["n_kv_head"]) == (method, n_kv)]
            steps = sorted({int(r["steps"]) for r in mine})
            loss = [np.mean([float(r["val_loss"]) for r in mine if int(r["steps"]) == s]) for s in steps]
            label = "control: baseline continued" if method == "control" else f"{method}-init, {n_kv} K/V heads"
            ax.plot([100 * s / total for s in steps], loss, marker="o", label=label)
        ax.set(
            xlabel=f"uptraining steps (% of the baseline's {total} pre-training steps)",
            ylabel="validation loss (nats/token, mean over seeds)",
            title="Uptraining from the multi-head baseline",
        )
        _legend(ax)
