"""The GPU check (run by scripts/gpu-check.sh): what the CPU test suite cannot show, in a few minutes on one GPU.

1. parity: gpt2lab's GPT-2 124M against transformers' GPT2LMHeadModel on CUDA, same weights: logits
   (fp32 with TF32 off, and bf16) and 32 greedy tokens;
2. training: 50 steps of 124M in bf16 with torch.compile through ``gpt2lab.train.loop.train``: tokens/s,
   MFU against the GPU's peak (gpt2lab.train.plan's FLOP count and peaks), peak memory vs the plan's estimate;
3. attention: sliding window 256 vs full causal, forward + backward at 4k tokens, and window = T equal
   to full attention;
4. decoding: greedy tokens/s of gpt2lab vs transformers, batch 1, fp32 and bf16.

Weights are the real GPT-2 when ``--weights`` names a folder either library reads, else random
(seeded) weights in the hub layout, loaded by both sides. Results go to ``--out`` (JSON) and a
Markdown table beside it, for docs/benchmarks.md. ``--smoke`` runs tiny sizes (also on CPU) to check
the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_gpt2lab, load_reference, save_random_reference  # noqa: E402

from gpt2lab.config import GPTConfig  # noqa: E402
from gpt2lab.files import write_json, write_text  # noqa: E402
from gpt2lab.kernels.lm_head_loss import lm_head_loss  # noqa: E402
from gpt2lab.model import GPT  # noqa: E402
from gpt2lab.train.plan import PEAK_FLOPS, plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(greedy=32, steps=50, batch=16, length=4096, window=256, repeats=5, new_tokens=256)
SMOKE = dict(greedy=8, steps=4, batch=2, length=512, window=64, repeats=1, new_tokens=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parity(weights: Path, device: torch.device, new_tokens: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 products for the fp32 comparison
    prompt = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours, ref = load_gpt2lab(weights, dtype).to(device), load_reference(weights, dtype).to(device)
        with torch.no_grad():
            a, b = ours(prompt).float(), ref(prompt).logits.float()
        result[f"{name}_max_abs_logit_diff"] = (a - b).abs().max().item()
        if name == "fp32":
            ref_ids = ref.generate(prompt[:1], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            our_ids = ours.generate(prompt[:1], new_tokens, temperature=0)
            result["greedy_tokens_equal"] = torch.equal(ref_ids.cpu(), torch.as_tensor(our_ids).cpu())
        del ours, ref
    torch.backends.cuda.matmul.allow_tf32 = True
    result["fp32_ok"] = result["fp32_max_abs_logit_diff"] < 1e-3
    return result


def training(device: torch.device, steps: int, batch: int, smoke: bool) -> dict:
    from gpt2lab.data.tokens import prepare
    from gpt2lab.train.config import load_config
    from gpt2lab.train.loop import train
    from gpt2lab.train.run import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        prepare("pydoc", Path(tmp) / "data")
        sets = [f"data.dir={tmp}/data", f"out_dir={tmp}/run", f"max_iters={steps}", f"batch_size={batch}",
                "grad_accum=1", "warmup_iters=10", "eval_interval=100000", "eval_iters=1", "ckpt_interval=100000",
                "log_interval=1", f"device={device.type}"]  # fmt: skip
        if smoke:
            sets += ["preset=tiny", "model.n_layer=2", "model.n_embd=64", "batch.block_size=64", "compile=false",
                     "dtype=float32"]  # fmt: skip
        cfg = load_config(ROOT / "configs" / "gpt2-124m.toml", sets)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - started
        dts = [r["dt"] for r in read_metrics(Path(tmp) / "run") if "dt" in r][min(10, steps // 2) :]
    return _training_figures(cfg, device, dts, seconds)


def _training_figures(cfg, device: torch.device, dts: list[float], seconds: float) -> dict:
    p = plan(cfg)
    tok_s = p["tokens_per_step"] / statistics.median(dts)
    gpu = (
        next((name for name in PEAK_FLOPS if name in torch.cuda.get_device_name()), None)
        if device.type == "cuda"
        else None
    )
    result = {
        "batch": f"{cfg.batch_size} x {cfg.block_size}",
        "steps": cfg.max_iters,
        "wall_s_incl_compile": seconds,
        "median_step_s": statistics.median(dts),
        "tokens_per_s": tok_s,
        "mfu": tok_s * p["flops"]["train_per_token"] / PEAK_FLOPS[gpu][p["dtype"]] if gpu else None,
        "planned_memory_gib": p["memory_per_gpu"]["ddp"]["total"] / 2**30,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _fwd_bwd_ms(model: GPT, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        sync(x.device)
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            loss = lm_head_loss(model.hidden_states(x), model.lm_head.weight, x)  # what `gpt2lab train` runs
        loss.backward()
        sync(x.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return 1000 * statistics.median(times)


def attention(device: torch.device, length: int, window: int, repeats: int, smoke: bool) -> dict:
    shape = dict(n_layer=2, n_head=4, n_embd=64) if smoke else dict(n_layer=12, n_head=12, n_embd=768)
    base = GPTConfig(pos_encoding="rope", block_size=length, **shape)
    torch.manual_seed(0)
    full = GPT(base).to(device)
    x = torch.randint(0, 50257, (1, length), device=device)
    windowed = GPT(base.replace(window=window)).to(device)
    windowed.load_state_dict(full.state_dict())
    whole = GPT(base.replace(window=length)).to(device)  # a window covering everything is full attention
    whole.load_state_dict(full.state_dict())
    with torch.no_grad():
        diff = (whole(x[:, :512]) - full(x[:, :512])).abs().max().item()
    full_ms, window_ms = _fwd_bwd_ms(full, x, repeats), _fwd_bwd_ms(windowed, x, repeats)
    return {"tokens": length, "window": window, "full_ms": full_ms, "window_ms": window_ms,
            "speedup": full_ms / window_ms, "window_T_vs_full_max_diff": diff}  # fmt: skip


def _decode_tok_s(fn, device: torch.device, new_tokens: int) -> float:
    fn()  # warm-up: kernels, allocator
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return new_tokens / (time.perf_counter() - start)


def decoding(weights: Path, device: torch.device, new_tokens: int) -> dict:
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours, ref = load_gpt2lab(weights, dtype).to(device), load_reference(weights, dtype).to(device)
        ours_tok_s = _decode_tok_s(lambda m=ours: m.generate(prompt, new_tokens, temperature=0), device, new_tokens)
        ref_tok_s = _decode_tok_s(
            lambda m=ref: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
            device,
            new_tokens,
        )
        result[name] = {"gpt2lab_tok_s": ours_tok_s, "transformers_tok_s": ref_tok_s, "ratio": ours_tok_s / ref_tok_s}
        del ours, ref
    return result


def markdown(results: dict) -> str:
    lines = [f"# GPU check: {results['device']} (torch {results['torch']})", ""]
    for section, values in results.items():
        if isinstance(values, dict):
            lines += [f"## {section}", "", "| figure | value |", "| --- | --- |"]
            for key, value in values.items():
                shown = (
                    json.dumps(value)
                    if isinstance(value, dict)
                    else (f"{value:.4g}" if isinstance(value, float) else value)
                )
                lines.append(f"| {key} | {shown} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="a GPT-2 folder (hub layout); default: random")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-check.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: checks the script itself")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("error: no CUDA device: the GPU check needs one (--smoke runs tiny sizes on CPU)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            weights = Path(tmp) / "random-gpt2"
            save_random_reference(weights)
        n = SMOKE if args.smoke else FULL
        for section, run in (
            ("parity", lambda: parity(weights, device, n["greedy"])),
            ("training", lambda: training(device, n["steps"], n["batch"], args.smoke)),
            ("attention", lambda: attention(device, n["length"], n["window"], n["repeats"], args.smoke)),
            ("decoding", lambda: decoding(weights, device, n["new_tokens"])),
        ):
            started = time.perf_counter()
            results[section] = run()
            print(f"{section} ({time.perf_counter() - started:.0f} s): {json.dumps(results[section])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    write_text(args.out.with_suffix(".md"), markdown(results))
    print(f"results: {args.out}, {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
