"""The variant study: train every variant of a suite under one budget, measure, plot, report.

A suite (TOML) names the data, the model shape shared by all variants, the training budget, the
seeds and the variants. ``run_study`` then

1. prepares the data once;
2. trains each variant with each seed, each run in a fresh process (so its peak memory is its own),
   evaluates it on the whole validation split (loss, loss by position, past the trained context for
   RoPE models), measures decode speed and KV-cache memory, and samples a fixed prompt;
3. uptrains GQA from the baseline (K/V heads mean-pooled, then a short continuation);
4. times attention forward+backward, full vs window, over sequence lengths;
5. writes ``results.csv`` (one row per variant), ``runs.csv`` (one row per run), ``cost.csv``,
   the PNG plots and ``report.md``, whose every number is read from those CSVs.

A run folder with ``result.json`` is finished and is not run again, and a run interrupted in
training resumes from its checkpoint: an interrupted study picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import GPT2LabError, GPTConfig
from .files import read_json, write_text
from .memory import peak_memory, reset_peak_memory
from .study_suite import Suite, group_by_variant, write_csv

# ---------------------------------------------------------------------------------------- isolation


def _child(queue, threads, fn, args) -> None:
    torch.set_num_threads(threads)
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report any failure to the parent as one line
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_isolated(fn, *args, threads: int | None = None):
    """``fn(*args)`` in a fresh process on ``threads`` threads (default: this process's count): its memory
    peak is its own, and a crash cannot take the study."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, threads or torch.get_num_threads(), fn, args))
    process.start()
    status, value = queue.get()
    process.join()
    if status != "ok":
        raise GPT2LabError(f"{getattr(fn, '__name__', fn)} failed: {value}")
    return value


# ---------------------------------------------------------------------------------------- one run


def _tokens_per_second(rows: list[dict], tokens_per_step: int) -> float:
    """Median training throughput over logged steps (the first few include warm-up and are skipped)."""
    dts = [r["dt"] for r in rows if "dt" in r]
    dts = dts[min(3, len(dts) - 1) :]
    return tokens_per_step / statistics.median(dts)


@torch.no_grad()
def _decode_speed(model, context: int, new_tokens: int) -> tuple[float, int]:
    """Greedy decode tokens/s after a ``context``-token prompt, and the KV-cache bytes that needs."""
    from .generation import sample_next

    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, context + new_tokens)
    logits = model(prompt, cache=cache, last_only=True)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(sample_next(logits[:, -1], temperature=0)[:, None], cache=cache, last_only=True)
    elapsed = time.perf_counter() - start
    return new_tokens / elapsed, sum(c.nbytes() for c in cache)


def _sample(model, eval_settings: dict[str, Any]) -> str:
    """The fixed prompt's continuation: seed 0, temperature 0.8, top-k 40."""
    from .generation import stream_text
    from .tokenizer import load_tokenizer

    prompt, tokens = eval_settings["sample_prompt"], eval_settings["sample_tokens"]
    return "".join(stream_text(model, load_tokenizer(), prompt, tokens, seed=0, temperature=0.8, top_k=40))


def train_and_measure(train_fields: dict[str, Any], eval_settings: dict[str, Any], run_dir: str) -> dict:
    """Train (resuming if a checkpoint exists), then evaluate and measure. Runs in its own process."""
    from .data import TokenData
    from .evaluation import evaluate
    from .run_state import CKPT_NAME, load_model, read_metrics
    from .train_config import TrainConfig
    from .training import train

    reset_peak_memory()
    cfg = TrainConfig(**train_fields)
    cfg.validate()
    summary = train(cfg, resume=(Path(run_dir) / CKPT_NAME).is_file())
    peak_train = peak_memory() / 2**20
    model = load_model(run_dir).eval()
    config = model.config
    val = np.asarray(TokenData.open(cfg.data_dir).val)
    result = evaluate(model, val, context=cfg.block_size)
    long_context = eval_settings["long_context"]
    by_position = result.by_position.tolist()
    if config.pos_encoding == "rope" and long_context > cfg.block_size and len(val) > long_context:
        by_position = evaluate(model, val, context=long_context).by_position.tolist()
    # Decode at the trained context (all variants can) and, for RoPE models, at the long context.
    n_new = eval_settings["decode_tokens"]
    decode_tok_s, _ = _decode_speed(model, cfg.block_size - n_new, n_new)
    decode_long = kv_long = None
    if config.pos_encoding == "rope" and long_context:
        decode_long, kv_long = _decode_speed(model, long_context, n_new)
    sample = _sample(model, eval_settings)
    rows = read_metrics(run_dir)
    out = {
        "val_loss": result.loss,
        "val_ppl": result.perplexity,
        "val_bpb": result.bits_per_byte,
        "train_tok_s": _tokens_per_second(rows, cfg.grad_accum * cfg.batch_size * cfg.block_size),
        "peak_rss_mb": peak_train,
        "decode_tok_s": decode_tok_s,
        "decode_tok_s_long": decode_long,
        "kv_bytes_long": kv_long,
        "by_position": by_position,
        "val_curve": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
        "sample": sample,
        "steps": summary["step"],
    }
    write_text(Path(run_dir) / "result.json", json.dumps(out) + "\n")
    return out


@torch.no_grad()
def converted_loss(base_dir: str, n_kv_head: int, data_dir: str, context: int) -> float:
    """Validation loss of the base model right after mean-pooling its K/V heads, before any training."""
    from .data import TokenData
    from .evaluation import evaluate
    from .run_state import load_model

    model = load_model(base_dir).convert_to_gqa(n_kv_head)
    return evaluate(model, np.asarray(TokenData.open(data_dir).val), context=context).loss


def attention_cost(seq_len: int, window: int | None, n_head: int, head_dim: int, repeats: int) -> dict:
    """Seconds and peak extra memory (MiB) of one attention forward+backward, B=1. Own process."""
    from .attention import causal_attention
    from .sliding_window import sliding_window_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n_head, seq_len, head_dim, generator=gen, requires_grad=True) for _ in range(3))

    def step():
        y = causal_attention(q, k, v) if window is None else sliding_window_attention(q, k, v, window)
        y.sum().backward()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        before = reset_peak_memory()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        extra = (peak_memory() - before) / 2**20
    return {"seconds": min(times), "peak_mb": extra}


# ---------------------------------------------------------------------------------------- the study


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_study(suite: Suite, out_dir: str | Path, log=print) -> Path:
    from .data import prepare

    out = Path(out_dir)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if not (data_dir / "meta.json").is_file():
        prepare(suite.data, data_dir)
    block_size = suite.train.get("block_size", suite.model.get("block_size", 256))
    base_train = {**suite.train, "data_dir": str(data_dir), "block_size": block_size}
    # Several single-thread runs at once use 2 cores better than one 2-thread run of these small models.
    pool = ThreadPoolExecutor(max_workers=suite.parallel)
    run_threads = max(1, torch.get_num_threads() // suite.parallel)

    def run(name: str, seed: int, fields: dict[str, Any]) -> dict:
        run_dir = runs_dir / f"{name}-s{seed}"
        done = run_dir / "result.json"
        if done.is_file():
            log(f"[study] {run_dir.name}: done earlier, kept")
            return read_json(done)
        log(f"[study] {run_dir.name}: training")
        train_fields = {**base_train, **fields, "seed": seed, "out_dir": str(run_dir)}
        return run_isolated(train_and_measure, train_fields, suite.eval, str(run_dir), threads=run_threads)

    def run_seeds(name: str, fields_of) -> list[dict]:
        return list(pool.map(lambda seed: run(name, seed, fields_of(seed)), suite.seeds))

    runs: list[dict] = []
    variant_rows: list[dict] = []
    for variant in suite.variants:
        config = suite.variant_config(variant)
        model_fields = {k: v for k, v in config.to_dict().items() if k != "vocab_size"}
        results = run_seeds(variant["name"], lambda _seed, f=model_fields: {"preset": None, "model": f})
        runs += [{"variant": variant["name"], "seed": s, **r} for s, r in zip(suite.seeds, results, strict=True)]
        variant_rows.append(_variant_row(variant["name"], "from scratch", config, results, suite, block_size))
    if suite.uptrain:
        variant_rows += _uptrain(suite, base_train, runs_dir, block_size, run_seeds, runs)
    pool.shutdown()
    _compare_to_baseline(variant_rows, runs)
    cost_rows = _attention_costs(suite, log)
    _write_tables(out, suite, runs, variant_rows, cost_rows, block_size)
    from .study_report import write_plots, write_report

    write_plots(out, runs, cost_rows, block_size, suite)
    return write_report(out, suite, block_size)


def _compare_to_baseline(variant_rows: list[dict], runs: list[dict]) -> None:
    """Each variant's loss difference to the baseline (the first row), KV ratio and steps to its loss."""
    base = variant_rows[0]
    for row in variant_rows:
        row["delta_loss"] = row["val_loss"] - base["val_loss"]
        # standard error of the difference of two seed means
        row["delta_loss_se"] = math.sqrt(
            row["val_loss_sd"] ** 2 / row["seeds"] + base["val_loss_sd"] ** 2 / base["seeds"]
        )
        row["kv_ratio_at_ctx"] = row["kv_kib_at_ctx"] / base["kv_kib_at_ctx"]
        row["steps_to_baseline"] = _steps_to(runs, row["variant"], base["val_loss"])


def _attention_costs(suite: Suite, log) -> list[dict]:
    cost_rows = []
    for seq_len in suite.cost["lengths"]:
        for window in (None, suite.cost["window"]):
            log(f"[study] attention cost T={seq_len} window={window}")
            c = run_isolated(
                attention_cost, seq_len, window, suite.cost["n_head"], suite.cost["head_dim"], suite.cost["repeats"]
            )
            cost_rows.append({"seq_len": seq_len, "window": window or "full", **c})
    return cost_rows


def _write_tables(out: Path, suite: Suite, runs: list[dict], variant_rows, cost_rows, block_size: int) -> None:
    write_csv(out / "results.csv", variant_rows)
    write_csv(
        out / "runs.csv",
        [{k: v for k, v in r.items() if k not in ("by_position", "val_curve", "sample")} for r in runs],
    )
    write_csv(out / "bands.csv", _position_bands(suite, runs, block_size))
    write_csv(
        out / "samples.csv",
        [{"variant": r["variant"], "sample": r["sample"]} for r in runs if r["seed"] == suite.seeds[0]],
    )
    if cost_rows:
        write_csv(out / "cost.csv", cost_rows)


def _variant_row(name, kind, config: GPTConfig, results: list[dict], suite: Suite, block_size: int) -> dict:
    from .analysis import model_report

    report = model_report(config, block_size)
    loss, loss_sd = _mean_sd([r["val_loss"] for r in results])
    first = results[0]
    return {
        "variant": name,
        "kind": kind,
        "pos_encoding": config.pos_encoding,
        "n_kv_head": config.n_kv_head,
        "window": config.window if config.window is not None else "full",
        "params": report["params"]["total"],
        "flops_per_token": report["flops_per_token"]["total"],
        "kv_bytes_per_token": report["kv_cache"]["bytes_per_token"],
        "kv_kib_at_ctx": report["kv_cache"]["bytes_at_seq_len"] / 1024,
        "train_tok_s": statistics.fmean(r["train_tok_s"] for r in results),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "val_loss": loss,
        "val_loss_sd": loss_sd,
        "val_ppl": math.exp(loss),
        "seeds": len(results),
        "decode_tok_s": statistics.fmean(r["decode_tok_s"] for r in results),
        "decode_tok_s_long": first["decode_tok_s_long"] if first["decode_tok_s_long"] is not None else "",
        "kv_kib_measured_long": first["kv_bytes_long"] / 1024 if first["kv_bytes_long"] is not None else "",
    }


def _steps_to(runs: list[dict], variant: str, target: float) -> int | str:
    """First evaluated step at which the seed-mean validation curve reaches ``target`` ('' if never)."""
    curves = [dict(r["val_curve"]) for r in runs if r["variant"] == variant]
    if not curves:
        return ""
    for step in sorted(curves[0]):
        if all(step in c for c in curves) and statistics.fmean(c[step] for c in curves) <= target:
            return step
    return ""


def _uptrain(suite, base_train, runs_dir, block_size, run_seeds, runs) -> list[dict]:
    """GQA uptraining (Ainslie et al. 2023): pool the trained baseline's K/V heads, continue briefly."""
    up = suite.uptrain
    n_kv = up["n_kv_head"]
    steps = max(1, round(up.get("fraction", 0.1) * base_train["max_iters"]))
    config = suite.variant_config(suite.variants[0]).replace(n_kv_head=n_kv)
    base_dirs = {seed: str(runs_dir / f"baseline-s{seed}") for seed in suite.seeds}
    converted = [
        run_isolated(converted_loss, base_dirs[seed], n_kv, base_train["data_dir"], block_size) for seed in suite.seeds
    ]

    def fields(seed: int) -> dict[str, Any]:
        return {
            "preset": None,
            "model": {},
            "init_from": base_dirs[seed],
            "convert_n_kv_head": n_kv,
            "max_iters": steps,
            "warmup_iters": max(1, steps // 10),
            "eval_interval": max(1, steps // 2),
            "ckpt_interval": steps,
        }

    uptrained = run_seeds(f"uptrain-gqa{n_kv}", fields)
    runs += [{"variant": f"uptrain-gqa{n_kv}", "seed": s, **r} for s, r in zip(suite.seeds, uptrained, strict=True)]
    loss, sd = _mean_sd(converted)
    pooled_row = _variant_row(f"pooled-gqa{n_kv}", "baseline K/V pooled, 0 steps", config, uptrained, suite, block_size)
    pooled_row.update(
        val_loss=loss,
        val_loss_sd=sd,
        val_ppl=math.exp(loss),
        train_tok_s="",
        peak_rss_mb="",
        decode_tok_s="",
        decode_tok_s_long="",
        kv_kib_measured_long="",
    )
    up_row = _variant_row(f"uptrain-gqa{n_kv}", f"pooled + {steps} steps", config, uptrained, suite, block_size)
    return [pooled_row, up_row]


def _position_bands(suite: Suite, runs: list[dict], block_size: int) -> list[dict]:
    """Mean validation loss over bands of context positions, per variant (mean over seeds).

    near: [0, W) - every variant sees all earlier tokens; far: [2W, block_size) - a windowed layer does not,
    so only stacking can carry that context; inside: the whole trained context; beyond: past it (RoPE).
    """
    windows = [w for v in suite.variants if isinstance(w := suite.variant_config(v).window, int)]
    W = min(windows) if windows else block_size // 4
    long_ctx = suite.eval["long_context"]
    spans = {"near": (0, W), "far": (2 * W, block_size), "inside": (0, block_size), "beyond": (block_size, long_ctx)}
    configs = {v["name"]: suite.variant_config(v) for v in suite.variants}
    rows = []
    for name, curves in group_by_variant(runs, "by_position").items():
        config = configs.get(name)
        receptive = "full"
        if config is not None and config.max_window is not None:
            receptive = sum(config.layer_window(i) - 1 for i in range(config.n_layer)) + 1
        for band, (start, end) in spans.items():
            if end <= start or any(len(c) < end for c in curves):
                continue
            loss = statistics.fmean(statistics.fmean(c[start:end]) for c in curves)
            rows.append(
                {
                    "variant": name,
                    "band": band,
                    "start": start,
                    "end": end - 1,
                    "loss": loss,
                    "receptive_field": receptive,
                }
            )
    return rows
