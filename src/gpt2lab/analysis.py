"""What a configuration costs, computed from its shape alone: parameters, FLOPs, KV-cache memory.

The numbers answer "what does this variant buy me?" before any training run, so every figure is
also given for the GPT-2 baseline of the same size (learned positions, multi-head, full attention)
and as a ratio to it. The formulas mirror :mod:`gpt2lab.model` exactly; the tests check them
against real modules and real caches.

Conventions:

* a multiply-add is 2 FLOPs; only matrix products are counted (biases, LayerNorm, GELU, softmax and
  RoPE are a few FLOPs per activation and would change GPT-2 small's total by < 1 %);
* "per token" FLOPs are the forward cost of a T-token sequence divided by T, so attention uses the
  mean number of keys a query sees: (T + 1) / 2 for full causal, less under a window. The banded
  kernel also multiplies masked-out entries; that waste is a kernel property, not counted here;
* the LM head is tied to the token embedding: its parameters are counted once (under ``wte``), its
  FLOPs are counted (it is a V × C matrix product for every position);
* V is the rows the model holds, ``vocab_rows``: a config padded for training (``padded_vocab_size``)
  stores and multiplies by every padded row, so they are counted as parameters, bytes and LM-head FLOPs,
  as llm.c counts its padded Vp. The exported model is the unpadded one: ``model_report(config.unpadded())``.
"""

from __future__ import annotations

from typing import Any

from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


# ---------------------------------------------------------------------------------------- counting


def baseline_of(config: GPTConfig) -> GPTConfig:
    """GPT-2 of the same size: learned positions, one K/V head per query head, full attention."""
    return config.replace(pos_encoding="learned", n_kv_head=config.n_head, window=None)


def mean_keys_seen(seq_len: int, window: int | None) -> float:
    """Mean over the T queries of a causal sequence of how many keys each attends to (itself included).

    Query i (1-based) sees min(i, W) keys, so the mean is (T + 1) / 2 without a window and tends to W
    when T >> W.
    """
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def _parameters(c: GPTConfig) -> dict[str, int]:
    C, kv_dim = c.n_embd, c.n_kv_head * c.head_dim
    attention = (C * (C + 2 * kv_dim) + C + 2 * kv_dim) + (C * C + C)  # c_attn (q|k|v) + c_proj
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)  # c_fc + c_proj
    counts = {
        "wte": c.vocab_rows * C,  # padded rows included: real parameters of the model in memory
        "wpe": c.block_size * C if c.pos_encoding == "learned" else 0,
        "attention": c.n_layer * attention,
        "mlp": c.n_layer * mlp,
        "layer_norm": c.n_layer * 2 * (2 * C) + 2 * C,  # ln_1, ln_2 per block, ln_f; weight + bias each
        "lm_head": 0,  # tied to wte
    }
    counts["total"] = sum(counts.values())
    counts["attention_per_layer"] = attention
    counts["mlp_per_layer"] = mlp
    return counts


def _flops_per_token(c: GPTConfig, seq_len: int) -> dict[str, float]:
    C, kv_dim = c.n_embd, c.n_kv_head * c.head_dim
    # Scores q·k and the weighted sum of values each cost 2·hs FLOPs per (query head, key) pair;
    # K/V sharing (GQA) saves memory, not these FLOPs.
    keys = [mean_keys_seen(seq_len, w) for w in c.layer_windows()]
    flops = {
        "attention_proj": c.n_layer * 2 * (C * (C + 2 * kv_dim) + C * C),
        "attention_scores": sum(2 * 2 * c.n_head * c.head_dim * k for k in keys),
        "mlp": c.n_layer * 2 * (2 * 4 * C * C),
        "lm_head": 2 * C * c.vocab_rows,  # the product runs over the padded rows; its logits are cut after
    }
    flops["total"] = sum(flops.values())
    return flops


def _kv_cache(c: GPTConfig, seq_len: int, dtype: str) -> dict[str, Any]:
    per_slot = 2 * c.n_kv_head * c.head_dim * DTYPE_BYTES[dtype]  # keys + values of one token, one layer
    slots = [seq_len if w is None else min(w, seq_len) for w in c.layer_windows()]
    return {
        "bytes_per_token": c.n_layer * per_slot,
        "bytes_at_seq_len": per_slot * sum(slots),
        "slots_per_layer": slots,
    }


def _costs(c: GPTConfig, seq_len: int, dtype: str) -> dict[str, Any]:
    params = _parameters(c)
    return {
        "params": params,
        "weight_bytes": params["total"] * DTYPE_BYTES[dtype],
        "flops_per_token": _flops_per_token(c, seq_len),
        "kv_cache": _kv_cache(c, seq_len, dtype),
    }


def model_report(config: GPTConfig, seq_len: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Parameters by part, forward FLOPs per token at ``seq_len`` and KV-cache bytes, for ``config`` and
    for its GPT-2 baseline, plus the ratios this/baseline.

    ``seq_len`` defaults to the context (``block_size``); RoPE models may go past it.
    ``dtype`` ("float32" or "bfloat16") sets the bytes of weights and cache entries.
    """
    seq_len = config.block_size if seq_len is None else seq_len
    if not isinstance(seq_len, int) or seq_len < 1:
        raise GPT2LabError(f"seq_len must be a positive integer, got {seq_len!r}")
    config.check_length(seq_len)
    if dtype not in DTYPE_BYTES:
        raise GPT2LabError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    base = baseline_of(config)
    this, ref = _costs(config, seq_len, dtype), _costs(base, seq_len, dtype)
    return {
        "config": config.to_dict(),
        "seq_len": seq_len,
        "dtype": dtype,
        **this,
        "baseline": {"config": base.to_dict(), **ref},
        "ratio_to_baseline": {
            "params": this["params"]["total"] / ref["params"]["total"],
            "flops_per_token": this["flops_per_token"]["total"] / ref["flops_per_token"]["total"],
            "kv_bytes_per_token": this["kv_cache"]["bytes_per_token"] / ref["kv_cache"]["bytes_per_token"],
            "kv_bytes_at_seq_len": this["kv_cache"]["bytes_at_seq_len"] / ref["kv_cache"]["bytes_at_seq_len"],
        },
    }


# ---------------------------------------------------------------------------------------- formatting


def _describe(c: dict[str, Any]) -> str:
    window = c["window"]
    if isinstance(window, list):
        window = ",".join("full" if w is None else str(w) for w in window)
    vocab = str(c["vocab_size"])
    if c["padded_vocab_size"] is not None:
        vocab += f" padded_vocab_size={c['padded_vocab_size']}"
    return (
        f"n_layer={c['n_layer']} n_head={c['n_head']} n_kv_head={c['n_kv_head']} n_embd={c['n_embd']} "
        f"vocab={vocab} block_size={c['block_size']} pos={c['pos_encoding']} window={window or 'full'}"
    )


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table: this model, the GPT-2 baseline of its size, the ratio."""
    T, base = report["seq_len"], report["baseline"]
    n_layer = report["config"]["n_layer"]
    rows: list[tuple[str, str, str, str]] = []

    def section(title: str) -> None:
        rows.append((title, "", "", ""))

    def row(label: str, this: float, ref: float, fmt) -> None:
        ratio = "-" if ref == 0 and this == 0 else ("new" if ref == 0 else f"{this / ref:.3f}x")
        rows.append((f"  {label}", fmt(this), fmt(ref), ratio))

    def count(n: float) -> str:
        return f"{n:,.0f}"

    p, bp = report["params"], base["params"]
    section("parameters")
    row("token embedding (wte)", p["wte"], bp["wte"], count)
    row("position embedding (wpe)", p["wpe"], bp["wpe"], count)
    row(f"attention ({n_layer} layers)", p["attention"], bp["attention"], count)
    row("  per layer", p["attention_per_layer"], bp["attention_per_layer"], count)
    row(f"MLP ({n_layer} layers)", p["mlp"], bp["mlp"], count)
    row("layer norms", p["layer_norm"], bp["layer_norm"], count)
    row("LM head (tied to wte)", p["lm_head"], bp["lm_head"], count)
    row("total", p["total"], bp["total"], count)
    row(f"weights ({report['dtype']})", report["weight_bytes"], base["weight_bytes"], _mib)

    f, bf = report["flops_per_token"], base["flops_per_token"]
    section(f"forward FLOPs per token (mean over T={T})")
    row("attention projections", f["attention_proj"], bf["attention_proj"], _human)
    row("attention scores + values", f["attention_scores"], bf["attention_scores"], _human)
    row("MLP", f["mlp"], bf["mlp"], _human)
    row("LM head", f["lm_head"], bf["lm_head"], _human)
    row("total", f["total"], bf["total"], _human)

    kv, bkv = report["kv_cache"], base["kv_cache"]
    section(f"KV cache per sequence ({report['dtype']})")
    row("per token (all layers)", kv["bytes_per_token"], bkv["bytes_per_token"], _mib)
    row(f"at T={T}", kv["bytes_at_seq_len"], bkv["bytes_at_seq_len"], _mib)

    header = ("", "this model", "GPT-2 same size", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [f"model:    {_describe(report['config'])}", f"baseline: {_describe(base['config'])}", ""]
    for cells in [header, *rows]:  # label left-aligned, numbers right-aligned
        lines.append(
            "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])
        )
    slots = kv["slots_per_layer"]
    if len(set(slots)) > 1:
        lines.append(f"  cache slots per layer at T={T}: {slots}")
    return "\n".join(line.rstrip() for line in lines)
