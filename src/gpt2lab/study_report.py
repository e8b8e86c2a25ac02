"""Plots and ``report.md`` of a variant study. Every number in the report is read back from the CSVs
the study wrote (``results.csv``, ``bands.csv``, ``cost.csv``), so text and data cannot disagree."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from .files import write_text
from .plots import plot_file
from .study_suite import Suite, group_by_variant, read_csv

TABLE_COLUMNS = [
    ("variant", "variant", "{}"),
    ("kind", "trained", "{}"),
    ("params", "params", "{:,.0f}"),
    ("flops_per_token", "MFLOP/token", "{:.2f}", 1e-6),
    ("kv_bytes_per_token", "KV B/token", "{:,.0f}"),
    ("kv_kib_at_ctx", "KV KiB @ctx", "{:,.0f}"),
    ("kv_kib_measured_long", "KV KiB @long", "{:,.0f}"),
    ("train_tok_s", "train tok/s", "{:,.0f}"),
    ("peak_rss_mb", "peak MiB", "{:,.0f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_loss_sd", "± sd", "{:.4f}"),
    ("val_ppl", "ppl", "{:.2f}"),
    ("delta_loss", "Δ loss", "{:+.4f}"),
    ("delta_loss_se", "± se", "{:.4f}"),
    ("decode_tok_s", "decode tok/s", "{:,.0f}"),
    ("decode_tok_s_long", "decode tok/s @long", "{:,.0f}"),
]


def fmt(row: dict[str, str], key: str) -> str:
    """A CSV cell as the report prints it (blank cells print as 'n/a')."""
    for column, _, pattern, *scale in TABLE_COLUMNS:
        if column == key:
            value = row[key]
            if value == "":
                return "n/a"
            try:
                number = float(value) * (scale[0] if scale else 1)
            except ValueError:
                return value
            return pattern.format(number)
    raise KeyError(key)


def results_table(rows: list[dict[str, str]]) -> str:
    header = "| " + " | ".join(title for _, title, *_ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(fmt(row, column) for column, *_ in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


# ---------------------------------------------------------------------------------------- plots


def write_plots(out: Path, runs: list[dict], cost_rows: list[dict], block_size: int, suite: Suite) -> None:
    _plot_loss_curves(out / "loss_curves.png", runs)
    _plot_loss_by_position(out / "loss_by_position.png", runs, block_size)
    if cost_rows:
        _plot_cost(out / "cost_vs_length.png", cost_rows, suite)
    _plot_quality_vs_kv(out / "quality_vs_kv.png", read_csv(out / "results.csv"), suite, block_size)


def _plot_loss_curves(path: Path, runs: list[dict]) -> None:
    with plot_file(path, size=(8, 4.5), dpi=110) as (ax,):
        for name, curves in group_by_variant(runs, "val_curve").items():
            steps = [s for s, _ in curves[0]]
            mean = np.mean([[v for _, v in c] for c in curves if len(c) == len(steps)], axis=0)
            ax.plot(steps, mean, marker=".", label=name)
        ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="Validation loss (mean over seeds)")
        ax.legend(fontsize=8)


def _plot_loss_by_position(path: Path, runs: list[dict], block_size: int) -> None:
    with plot_file(path, size=(8, 4.5), dpi=110) as (ax,):
        for name, curves in group_by_variant(runs, "by_position").items():
            length = min(len(c) for c in curves)
            mean = np.mean([c[:length] for c in curves], axis=0)
            smooth = np.convolve(mean, np.ones(8) / 8, mode="valid")  # 8-position moving average
            ax.plot(np.arange(len(smooth)) + 4, smooth, lw=1.2, label=name)
        ax.axvline(block_size, ls="--", color="gray", label=f"trained context ({block_size})")
        ax.set_xscale("log")
        ax.set(xlabel="position in context", ylabel="loss (nats/token)", title="Loss by position (validation)")
        ax.legend(fontsize=8)


_COST_PANELS = (("seconds", "forward+backward seconds"), ("peak_mb", "peak extra MiB"))


def _plot_cost(path: Path, cost_rows: list[dict], suite: Suite) -> None:
    with plot_file(path, size=(10, 4), dpi=110, panels=len(_COST_PANELS), grid="both") as axes:
        for ax, (key, label) in zip(axes, _COST_PANELS, strict=True):
            for window in dict.fromkeys(r["window"] for r in cost_rows):
                pts = [(r["seq_len"], r[key]) for r in cost_rows if r["window"] == window]
                ax.plot(*zip(*pts, strict=True), marker="o", label="full causal" if window == "full" else f"W={window}")
            ax.set(xlabel="sequence length T", ylabel=label, xscale="log", yscale="log")
            ax.legend()
        axes[0].figure.suptitle(f"Attention cost, B=1, {suite.cost['n_head']} heads of {suite.cost['head_dim']}")


def _plot_quality_vs_kv(path: Path, rows: list[dict[str, str]], suite: Suite, block_size: int) -> None:
    with plot_file(path, size=(7, 4.5), dpi=110) as (ax,):
        for row in rows:
            x, y, err = float(row["kv_kib_at_ctx"]), float(row["val_loss"]), float(row["val_loss_sd"])
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
            ax.annotate(row["variant"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set(
            xlabel=f"KV cache at {suite.eval['long_context'] or block_size} tokens (KiB, fp32)",
            ylabel="validation loss",
            title="Quality vs KV-cache size",
            xscale="log",
        )


# ---------------------------------------------------------------------------------------- report


def _verdict(delta: float, se: float, better: str, worse: str, same: str) -> str:
    if delta < -2 * se:
        return better
    if delta > 2 * se:
        return worse
    return same


# Prose of the report that no measurement changes.
_CHALLENGES_AND_CHOICES = [
    "## Challenges met in implementing them",
    "",
    "- **Window off-by-one.** Mistral counts the query itself in its `sliding_window`; Longformer's one-sided "
    "window counts only the keys before it. gpt2lab's `window = W` is W keys *including* the query, and a test "
    "checks the boundary exactly with uniform attention over known values.",
    "- **Prompts longer than the window.** Prefill must use the banded kernel for the whole prompt and keep only "
    "the last W keys in the rolling cache; a chunked prefill into a ring that already holds tokens must still "
    "see the keys it is about to evict (tested).",
    "- **RoPE and cache positions.** Keys are cached *after* rotation, so ring order is irrelevant, but position "
    "ids must count real tokens only in left-padded batches, or a padded row decodes differently from the "
    "same prompt alone (tested for every combination).",
    "- **Checkpoint compatibility.** RoPE models have no `wpe`, GQA models a narrower `c_attn`: neither loads "
    "into GPT-2 code. Converting MHA to GQA is a mean-pool of K/V rows (biases included) in GPT-2's packed "
    "`c_attn`; `export_hf` writes them as transformers architectures that compute them exactly (GQA as GPT-2 "
    "with repeated K/V heads, MQA as GPTBigCode, RoPE as Starcoder2); per-layer windows stay in gpt2lab's format.",
    "",
    "## When to choose what",
    "",
    "- **RoPE** when a model must run past its trained context (with a window it decodes with constant memory "
    "forever); it costs no parameters and removes the position table.",
    "- **GQA** when decode memory or bandwidth bounds serving: the KV cache shrinks by n_kv_head/n_head; "
    "uptraining a pooled checkpoint recovers most of the quality for a fraction of the training.",
    "- **Sliding window** for long sequences: cost grows linearly, not quadratically, with T, and the rolling "
    "cache caps memory; stacking layers extends the receptive field, but tokens further back than "
    "n_layer·(W−1) are invisible.",
    "",
    "## Samples (fixed prompt, seed 0, temperature 0.8, top-k 40)",
    "",
]


def write_report(out: Path, suite: Suite, block_size: int) -> Path:
    rows = {r["variant"]: r for r in read_csv(out / "results.csv")}
    bands = read_csv(out / "bands.csv")
    cost = read_csv(out / "cost.csv") if (out / "cost.csv").is_file() else []
    base = rows["baseline"]
    train = suite.train
    tokens = int(train["max_iters"]) * int(train.get("batch_size", 8)) * int(train.get("grad_accum", 1)) * block_size
    long_ctx = suite.eval["long_context"]
    lines = [
        f"# Variant study: {suite.name}",
        "",
        "Reproduce with:",
        "",
        "```bash",
        f"gpt2lab study --suite configs/study/{suite.name}.toml --data {suite.data} --out {out}"
        + "".join(f" --set {shlex.quote(item)}" for item in suite.overrides),
        "```",
        "",
        f"Every variant has the shape {suite.model} and trains for {train['max_iters']} steps of "
        f"{int(train.get('batch_size', 8)) * int(train.get('grad_accum', 1))} × {block_size} tokens "
        f"({tokens:,} tokens) with the same data order, optimizer, schedule and seeds {suite.seeds}. "
        f"Data: `{suite.data}`, GPT-2 BPE, last 10 % of tokens held out. Validation loss is measured on the whole "
        "held-out split in non-overlapping windows of the trained context; ± sd is the spread over seeds, ± se the "
        "standard error of the difference to the baseline. Speeds are CPU measurements on a shared 2-core "
        "machine: compare them within this table only.",
        "",
        "## Results",
        "",
        results_table(list(rows.values())),
        "",
        "![validation loss](loss_curves.png) ![loss by position](loss_by_position.png)",
        "![quality vs KV cache](quality_vs_kv.png)" + (" ![attention cost](cost_vs_length.png)" if cost else ""),
        "",
        "## What each change costs and buys",
        "",
    ]
    lines += _rope_section(rows, base, bands, block_size, long_ctx)
    lines += _gqa_section(rows, base)
    lines += _window_section(rows, base, bands, cost)
    lines += _CHALLENGES_AND_CHOICES
    for sample in read_csv(out / "samples.csv"):
        lines += [f"**{sample['variant']}**", "", "```", sample["sample"].strip(), "```", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _band(bands, variant, name):
    for b in bands:
        if b["variant"] == variant and b["band"] == name:
            return b
    return None


def _rope_section(rows, base, bands, block_size, long_ctx) -> list[str]:
    if "rope" not in rows:
        return []
    r = rows["rope"]
    delta, se = float(r["delta_loss"]), float(r["delta_loss_se"])
    reached = r["steps_to_baseline"] or "never within the budget"
    text = [
        "### RoPE (RoFormer)",
        "",
        f"RoPE ends at {fmt(r, 'val_loss')} ± {fmt(r, 'val_loss_sd')} against the baseline's "
        f"{fmt(base, 'val_loss')} ± {fmt(base, 'val_loss_sd')} (Δ {fmt(r, 'delta_loss')} ± {fmt(r, 'delta_loss_se')}), "
        f"with {fmt(r, 'params')} parameters instead of {fmt(base, 'params')} (no position table). "
        f"It reaches the baseline's final loss at step {reached}. ",
        _verdict(
            delta,
            se,
            "This agrees with RoFormer's claim of faster convergence / lower loss.",
            "This contradicts RoFormer's claim at this scale: likely the tiny budget and model, where the "
            "learned table is cheap to fit.",
            "The difference is within the seed noise: at this scale the claim is neither confirmed nor refuted.",
        ),
    ]
    beyond = [b for b in bands if b["band"] == "beyond" and b["variant"] in rows]
    if beyond and long_ctx:
        inside = {b["variant"]: _band(bands, b["variant"], "inside") for b in beyond}
        parts = [f"{b['variant']} {float(inside[b['variant']]['loss']):.3f} → {float(b['loss']):.3f}" for b in beyond]
        text += [
            "",
            f"Past the trained context (positions {block_size}–{long_ctx - 1}, mean loss inside → beyond): "
            + "; ".join(parts)
            + ". Learned positions cannot be evaluated there at all.",
        ]
    return text + [""]


def _gqa_section(rows, base) -> list[str]:
    text = ["### Grouped-query and multi-query attention", ""]
    for name in ("gqa", "mqa"):
        if name in rows:
            r = rows[name]
            text.append(
                f"- **{name}** (n_kv_head={r['n_kv_head']}): KV cache {fmt(r, 'kv_bytes_per_token')} B/token vs "
                f"{fmt(base, 'kv_bytes_per_token')}, params {fmt(r, 'params')}, Δ loss {fmt(r, 'delta_loss')} ± "
                f"{fmt(r, 'delta_loss_se')}, decode {fmt(r, 'decode_tok_s')} tok/s vs {fmt(base, 'decode_tok_s')}."
            )
    pooled = next((r for k, r in rows.items() if k.startswith("pooled-")), None)
    up = next((r for k, r in rows.items() if k.startswith("uptrain-")), None)
    if pooled and up:
        text += [
            "",
            f"Uptraining: mean-pooling the trained baseline's K/V heads to {up['n_kv_head']} gives "
            f"{fmt(pooled, 'val_loss')} before any training; after {up['kind'].split('+ ')[-1]} it reaches "
            f"{fmt(up, 'val_loss')} ± {fmt(up, 'val_loss_sd')} (baseline {fmt(base, 'val_loss')}"
            + (f", GQA from scratch {fmt(rows['gqa'], 'val_loss')}" if "gqa" in rows else "")
            + "). "
            + (
                "As in the GQA paper, the uptrained model beats GQA trained from scratch at a fraction of the steps."
                if "gqa" in rows and float(up["val_loss"]) < float(rows["gqa"]["val_loss"])
                else "Unlike the GQA paper, uptraining does not beat GQA from scratch here; with so few steps the "
                "from-scratch model had the same budget as the baseline, far more than the uptraining."
            ),
        ]
    return text + [""]


def _window_section(rows, base, bands, cost) -> list[str]:
    windowed = [r for r in rows.values() if r["window"] not in ("full", "") and r["kind"] == "from scratch"]
    if not windowed:
        return []
    text = ["### Sliding-window attention (Longformer / Mistral)", ""]
    if cost:
        largest = max(int(c["seq_len"]) for c in cost)
        full = next(c for c in cost if int(c["seq_len"]) == largest and c["window"] == "full")
        win = next(c for c in cost if int(c["seq_len"]) == largest and c["window"] != "full")
        text.append(
            f"Cost: at T={largest}, attention forward+backward takes {float(full['seconds']):.3f} s full causal and "
            f"{float(win['seconds']):.3f} s with W={win['window']} "
            f"({float(full['seconds']) / float(win['seconds']):.1f}× faster), peak extra memory "
            f"{float(full['peak_mb']):.0f} vs {float(win['peak_mb']):.0f} MiB (see cost.csv for every length)."
        )
    far_base = _band(bands, "baseline", "far")
    for r in windowed:
        text.append(
            f"- **{r['variant']}** (W={r['window']}): Δ loss {fmt(r, 'delta_loss')} ± {fmt(r, 'delta_loss_se')}, "
            f"KV cache at the trained context {fmt(r, 'kv_kib_at_ctx')} KiB vs {fmt(base, 'kv_kib_at_ctx')}; "
            f"measured at the long context: {fmt(r, 'kv_kib_measured_long')} KiB."
        )
        far = _band(bands, r["variant"], "far")
        if far and far_base:
            text.append(
                f"  Receptive field of {r['variant']}: positions {far['start']}–{far['end']} (beyond 2W) have loss "
                f"{float(far['loss']):.3f} vs {float(far_base['loss']):.3f} for the baseline; stacked layers see "
                f"up to {far['receptive_field']} tokens back."
            )
    return text + [""]
