"""The variant study: train every variant of a suite under one budget, measure, plot, report.

A suite (TOML) names the data and its tokenizer, the model shape shared by all variants, the training
budget, the seeds and the variants. ``run_study`` then

1. prepares the data once and scores Witten-Bell n-gram models (n = 1..5) on the study's evaluation
   tokens and windows (reference lines; :mod:`gpt2lab.data.count_models`);
2. trains each variant with each seed, each run in a fresh process, and evaluates it on the same
   validation tokens (loss, loss by position, at 1x/2x/4x the trained context, and with the context
   cut to c tokens: :mod:`gpt2lab.study.context_use`), recording its step time and peak memory;
3. uptrains GQA and MQA from each seed's baseline's final state at several fractions of its steps,
   beside the baseline continued and the converted shape from scratch (:mod:`gpt2lab.study.uptrain`);
4. trains each variant's shape on a passkey task to probe its receptive field (:mod:`gpt2lab.study.probe`);
5. writes the CSVs (``results.csv``, ``comparisons.csv`` with paired t intervals and Holm, ``bands.csv``,
   ``context_use.csv``,
   ``runs.csv``, ``references.csv``, ``uptrain.csv``, ``probe.csv``, ``extrapolation.csv``), the plots
   and ``report.md``, whose every number is read back from those CSVs (and the benchmark CSV it cites).

A study folder belongs to one suite (``suite.json``): an interrupted study resumes where it stopped,
finished runs are kept, and a folder made by another suite is refused rather than mixed in. With
``max_minutes`` a call is one chunk: the report is built from the runs present and names the missing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from gpt2lab.analysis import model_report
from gpt2lab.data.count_models import ngram_references
from gpt2lab.data.tokens import TokenData, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.files import read_json, write_text
from gpt2lab.outputs import META_FILE, REPORT_FILE, STUDY, SUITE_FILE, guard_output
from gpt2lab.study.context_use import effective_context
from gpt2lab.study.extrapolation import band_means
from gpt2lab.study.plots import write_plots
from gpt2lab.study.probe import probe_distances, run_probe
from gpt2lab.study.report import write_report
from gpt2lab.study.runs import OutOfTime, Runs, eval_tokens
from gpt2lab.study.stats import holm, paired_difference
from gpt2lab.study.suite import Suite, group_by_variant, read_csv, receptive_reach, write_csv
from gpt2lab.study.uptrain import run_uptraining, uptrain_pairs
from gpt2lab.train.config import upgrade_train_fields


def _claim_folder(out: Path, suite: Suite) -> None:
    """A study folder holds the runs of one suite: refuse to mix another suite's runs into it."""
    guard_output(out, STUDY, resume=True)  # a run, data, a model or one's own files are never a study's folder
    marker = out / SUITE_FILE
    fingerprint = json.loads(json.dumps(suite.fingerprint()))  # as JSON reads it back (tuples -> lists)
    if marker.is_file():
        saved = read_json(marker)
        if isinstance(saved.get("train"), dict):  # a study made before [train] block_size became seq_len
            saved["train"] = upgrade_train_fields(saved["train"], str(marker))
        if saved != fingerprint:
            raise GPT2LabError(
                f"{out} holds a study of other settings (see {marker}); use a new --out or delete that folder"
            )
        return
    if (out / "runs").exists():
        raise GPT2LabError(f"{out} holds runs of an unknown suite (no suite.json); use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text(marker, json.dumps(fingerprint, indent=1) + "\n")


def _prepare(suite: Suite, data_dir: Path) -> int:
    """Prepare the suite's data once; its vocabulary size."""
    if not (data_dir / META_FILE).is_file():
        # The default (GPT-2 BPE) needs no tokenizer argument; other tokenizers name themselves.
        options = {} if suite.tokenizer == "gpt2" else {"tokenizer": suite.tokenizer}
        prepare(suite.data, data_dir, **options)
    return int(TokenData.open(data_dir).meta["vocab_size"])


def run_study(suite: Suite, out_dir: str | Path, log=print, max_minutes: float | None = None) -> Path:
    """Train, measure and report ``suite`` into ``out_dir``. With ``max_minutes`` no run starts after that
    many minutes and running ones stop at a checkpoint; the report is built from the finished runs and
    names the missing ones, and the next call resumes (a study in chunks)."""
    out = Path(out_dir)
    _claim_folder(out, suite)
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    data_dir = out / "data"
    vocab = _prepare(suite, data_dir)
    context = suite.train.get("seq_len", suite.model.get("block_size", 256))
    base_fields = {**suite.train, "data_dir": str(data_dir), "seq_len": context}
    settings = {
        "max_tokens": suite.eval["max_tokens"],
        "extrapolation": suite.extrapolation,
        "context_targets": suite.eval["context_targets"],
    }
    runs = Runs(out / "runs", base_fields, settings, suite.parallel, log, deadline)
    _write_references(out, suite, data_dir, vocab, context)
    jobs = []
    for variant in suite.variants:
        config = suite.variant_config(variant, vocab)
        model_fields = {k: v for k, v in config.to_dict().items() if k != "vocab_size"}
        jobs += [(variant["name"], seed, {"preset": None, "model": model_fields}) for seed in suite.seeds]
    done = runs.many(jobs)
    results = [{"variant": name, "seed": seed, **r} for (name, seed, _), r in zip(jobs, done, strict=True) if r]
    base = {r["seed"]: r["val_loss"] for r in results if r["variant"] == "baseline"}
    if suite.uptrain and len(base) == len(suite.seeds):  # continuations start from every seed's baseline
        rows = run_uptraining(suite, runs, base, context, log)
        if rows:
            write_csv(out / "uptrain.csv", rows)
            write_csv(out / "uptrain_pairs.csv", uptrain_pairs(rows))
    elif suite.uptrain:
        runs.missing.append("uptraining (waits for every seed's baseline)")
    if suite.probe:
        _run_probe(out, suite, vocab, runs, log)
    runs.close()
    write_text(out / "missing.txt", "".join(f"{name}\n" for name in runs.missing))
    if not any(r["variant"] == "baseline" for r in results):
        return _report_without_baseline(out, runs.missing)
    _write_tables(out, suite, results, vocab, context)
    write_plots(out, suite, results, context)
    return write_report(out, suite, context)


def _write_references(out: Path, suite: Suite, data_dir: Path, vocab: int, context: int) -> None:
    """The n-gram reference losses on the study's evaluation tokens and windows, computed once per folder."""
    path = out / "references.csv"
    if path.is_file() and {r["model"] for r in read_csv(path)} >= {"1-gram", "5-gram"}:
        return
    data = TokenData.open(data_dir)
    references = ngram_references(
        data.train, eval_tokens(str(data_dir), context, suite.eval["max_tokens"]), vocab, context
    )
    write_csv(path, [{"model": k, "val_loss": v} for k, v in references.items()])


def _report_without_baseline(out: Path, missing: list[str]) -> Path:
    path = out / REPORT_FILE
    lines = ["# Variant study: not yet reportable", "", "No baseline run has finished; missing runs:", ""]
    write_text(path, "\n".join(lines + [f"- {name}" for name in missing]) + "\n")
    return path


def probe_settings(suite: Suite) -> dict:
    return {
        "context": suite.model.get("block_size", 256),
        "steps": 300,
        "batch_size": 32,
        "lr": 3e-3,
        "samples": 256,
        "seeds": suite.seeds[:1],
        **(suite.probe or {}),
    }


def _run_probe(out: Path, suite: Suite, vocab: int, runs: Runs, log) -> None:
    settings = probe_settings(suite)
    configs = {v["name"]: suite.variant_config(v, vocab) for v in suite.variants}
    names = settings.get("variants") or list(configs)
    distances = probe_distances(settings, [receptive_reach(configs[n]) for n in names])
    jobs = [(name, seed) for name in names for seed in settings["seeds"]]

    def probe(job: tuple[str, int]) -> dict:
        name, seed = job
        # the probe may narrow the model ([probe.model]); depth, heads and windows stay the variant's
        fields = {k: v for k, v in configs[name].to_dict().items() if k != "vocab_size"} | settings.get("model", {})
        return _cached_probe(runs, out / "runs" / f"probe-{name}-s{seed}.json", fields, settings, seed, distances, log)

    rows = []
    measured_all = list(runs.pool.map(probe, jobs))
    if None in measured_all:
        return  # the next call finishes the probes; probe.csv is written from all of them
    for (name, seed), measured in zip(jobs, measured_all, strict=True):
        reach = receptive_reach(configs[name])
        for d, acc, seen in zip(distances, measured["accuracy"], measured["visible"], strict=True):
            rows.append(
                {"variant": name, "seed": seed, "distance": d, "reach": "full" if reach is None else reach,
                 "within_reach": reach is None or d <= reach, "key_visible": seen, "accuracy": acc}
            )  # fmt: skip
    write_csv(out / "probe.csv", rows)


def _cached_probe(runs: Runs, path: Path, fields: dict, settings: dict, seed: int, distances: list[int], log) -> dict:
    """One probe's measurements, kept in ``path`` with what made them: an interrupted study keeps finished probes."""
    made_by = json.loads(json.dumps({"fields": fields, "settings": settings, "seed": seed, "distances": distances}))
    if path.is_file() and (kept := read_json(path))["made_by"] == made_by:
        return kept
    if runs.out_of_time():
        runs.missing.append(path.stem)
        return None
    log(f"[study] receptive-field probe: {path.stem}")
    try:
        measured = runs.isolated(run_probe, fields, settings, seed, distances)
    except OutOfTime:
        runs.missing.append(path.stem)
        return None
    write_text(path, json.dumps({"made_by": made_by, **measured}) + "\n")
    return measured


def _write_tables(out: Path, suite: Suite, results: list[dict], vocab: int, context: int) -> None:
    write_csv(
        out / "runs.csv",
        [
            {k: v for k, v in r.items() if k not in ("by_position", "val_curve", "extrapolation", "fields")}
            for r in results
        ],
    )
    present = [v for v in suite.variants if any(r["variant"] == v["name"] for r in results)]
    write_csv(out / "results.csv", [_variant_row(suite, v, vocab, context, results) for v in present])
    if any(r.get("context_use") for r in results):
        write_csv(out / "context_use.csv", _context_use_rows(results))
    loss = {(r["variant"], r["seed"]): r["val_loss"] for r in results}
    comparisons = []
    for v in suite.variants[1:]:
        ref = suite.reference_of(v)
        mine = {s: loss[(v["name"], s)] for s in suite.seeds if (v["name"], s) in loss}
        theirs = {s: loss[(ref, s)] for s in suite.seeds if (ref, s) in loss}
        if mine and theirs:
            comparisons.append({"variant": v["name"], "reference": ref, **paired_difference(mine, theirs)})
    if comparisons:
        write_csv(out / "comparisons.csv", holm(comparisons))
    write_csv(out / "bands.csv", _position_bands(suite, results, vocab, context))
    if suite.extrapolation:
        rows = []
        for name, curves in group_by_variant([r for r in results if r.get("extrapolation")], "extrapolation").items():
            for method in curves[0]:
                per_seed = [band_means(c[method], context) for c in curves]
                for band in per_seed[0]:
                    value = statistics.fmean(b[band] for b in per_seed)
                    rows.append({"variant": name, "method": method, "band": band, "loss": value})
        if rows:
            write_csv(out / "extrapolation.csv", rows)


def _variant_row(suite: Suite, variant: dict, vocab: int, context: int, results: list[dict]) -> dict:
    config = suite.variant_config(variant, vocab)
    report = model_report(config, context)
    mine = [r for r in results if r["variant"] == variant["name"]]
    losses = [r["val_loss"] for r in mine]
    reach = receptive_reach(config)
    early = suite.eval["early_positions"]
    return {
        "variant": variant["name"],
        "pos_encoding": config.pos_encoding,
        "n_kv_head": config.n_kv_head,
        "window": config.window if config.window is not None else "full",
        "reach": "full" if reach is None else reach,
        "params": report["params"]["total"],
        "kv_bytes_per_token": report["kv_cache"]["bytes_per_token"],
        "kv_kib_at_ctx": report["kv_cache"]["bytes_at_seq_len"] / 1024,
        "flops_per_token": report["flops_per_token"]["total"],
        # medians over seeds: on a shared machine one disturbed run should not move a variant's cost
        "train_tok_s": statistics.median(r["train_tok_s"] for r in mine),
        "step_ms": statistics.median(r.get("step_ms", float("nan")) for r in mine),
        "peak_mib": statistics.fmean(r.get("peak_mib", float("nan")) for r in mine),
        "effective_context": _effective_context(mine),
        "seeds": len(losses),
        "val_loss": statistics.fmean(losses),
        "val_loss_sd": statistics.stdev(losses) if len(losses) > 1 else "",
        "loss_first": statistics.fmean(statistics.fmean(r["by_position"][:early]) for r in mine),
        "loss_late": statistics.fmean(statistics.fmean(r["by_position"][context // 2 :]) for r in mine),
        "eval_tokens": mine[0]["eval_tokens"],
        "eval_sha": mine[0]["eval_sha"],
    }


def _context_use_rows(results: list[dict]) -> list[dict]:
    """context_use.csv: per variant and cut length c, the mean over seeds of loss(c) and of loss(c) - loss(full)."""
    rows = []
    for name, curves in group_by_variant([r for r in results if r.get("context_use")], "context_use").items():
        for i, c in enumerate(curves[0]["lengths"]):
            losses = [curve["loss"][i] for curve in curves]
            costs = [curve["loss"][i] - curve["loss"][-1] for curve in curves]
            rows.append(
                {"variant": name, "context": c, "loss": statistics.fmean(losses), "cost": statistics.fmean(costs),
                 "cost_sd": statistics.stdev(costs) if len(costs) > 1 else "", "seeds": len(curves)}
            )  # fmt: skip
    return rows


def _effective_context(mine: list[dict]) -> float | str:
    """Mean over seeds of each run's effective context (see gpt2lab.study.context_use), or blank."""
    found = [
        effective_context(r["context_use"]["lengths"], r["context_use"]["loss"]) for r in mine if r.get("context_use")
    ]
    return statistics.fmean(found) if found else ""


def _position_bands(suite: Suite, results: list[dict], vocab: int, context: int) -> list[dict]:
    """Mean loss (over seeds) of every variant over the same bands of context positions: the first
    ``early_positions``, the second half, and for each windowed reach r < context - 1, positions past it
    (only stacking beyond r could see their earliest tokens; a windowed model sees none of them)."""
    early = suite.eval["early_positions"]
    spans = {f"first {early}": (0, early), "second half": (context // 2, context)}
    for v in suite.variants:
        reach = receptive_reach(suite.variant_config(v, vocab))
        if reach is not None and reach + 1 < context:
            spans[f"past reach {reach}"] = (reach + 1, context)
    rows = []
    for name, curves in group_by_variant(results, "by_position").items():
        for band, (start, end) in spans.items():
            loss = statistics.fmean(statistics.fmean(c[start:end]) for c in curves)
            rows.append({"variant": name, "band": band, "start": start, "end": end - 1, "loss": loss})
    return rows
