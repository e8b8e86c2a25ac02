"""llama.cpp (through llama-cpp-python) against gpt2lab and transformers, on the same random GPT-2 124M weights.

The weights are made once (transformers' GPT2LMHeadModel, seed 0), read by gpt2lab, and written by
``gpt2lab export --format gguf`` as f32 and q8_0 files, which llama.cpp loads. Then:

1. **Parity** (exit code 1 if any fails):
   * tokenizer: llama.cpp's tokens of a mixed text (accents, CJK, emoji, runs of spaces) equal gpt2lab's;
   * f32: llama.cpp's logits at every position of a prompt are within 1e-3 of gpt2lab's fp32 logits computed
     with ggml's GELU (below); and with every GELU input pushed past 10 (where ggml passes x through
     exactly), within 1e-5 of gpt2lab's: the rest of llama.cpp's f32 graph is f32 arithmetic;
   * q8_0: llama.cpp's greedy tokens equal gpt2lab fp32's for at least 32 steps.
2. **Speed**: greedy decoding, prompt 16 tokens, ``--new-tokens`` new ones, batch 1, every contender on the
   same ``--threads``: llama.cpp f32 and q8_0, gpt2lab fp32 and int8 (eager, and compiled as
   ``gpt2lab generate --compile`` runs them; the compile happens in the untimed warm-up round), transformers
   fp32. Contenders run
   alternately, round by round (benchmarks/common.py says why); the medians are reported as tokens/s
   (new tokens / wall time, prefill included, as benchmarks/inference.py counts).

ggml's CPU GELU is not f32: it rounds x to fp16 and looks GELU up in a table of fp16 values (exactly,
for |x| < 10: ``ggml_gelu``, reproduced bit for bit by ``ggml_gelu`` here, checked on llama.cpp's own layer-0
tensors). That alone moves the 124M model's logits ~1.2e-3 from the exact tanh GELU, and its rounding steps
amplify last-bit differences: gpt2lab with that GELU in fp32 and in fp64 differ by ~8e-4. The f32 check
therefore compares like with like and prints the exact-GELU gap and that floor beside it.

llama-cpp-python builds llama.cpp from source when installed (``pip install llama-cpp-python``, 10-20
minutes on 2 cores); it is no dependency of gpt2lab or of its tests.

    python benchmarks/llamacpp.py [--threads 2] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2lab.cli.kernel_report import cpu_description
from gpt2lab.tokenizer import gpt2_bpe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, load_average, load_gpt2lab, load_reference, median, save_random_reference  # noqa: E402
from llamacpp_tensors import capture  # noqa: E402

PROMPT = 16
TEXT = "Hello world! It's 2024: naïve café, “quotes”, 中文, emoji 🙂 and   three spaces.\n\tA tab."
LOGIT_TOLERANCE = 1e-3
GRAPH_TOLERANCE = 1e-5  # fp32 rounding over 12 layers (measured ~2e-6)
GREEDY_STEPS = 32


def prompt_ids() -> list[int]:
    return torch.randint(0, 50257, (PROMPT,), generator=torch.Generator().manual_seed(PROMPT)).tolist()


def parity_ids() -> list[int]:
    """The prompt of the logit checks: random ids, then the mixed text's tokens."""
    return prompt_ids() + gpt2_bpe().encode_ordinary(TEXT)


def open_llama(path: Path, threads: int, f32_cache: bool = False):
    """llama.cpp on ``path``. Its KV cache is f16 by default, which alone moves logits by ~1e-3; the parity
    checks use an f32 cache (``-ctk f32 -ctv f32``), the speed runs llama.cpp's defaults, as users get them."""
    import llama_cpp

    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
        logits_all=True, verbose=False, **cache,
    )  # fmt: skip


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``ids``, sampled inside llama.cpp (its greedy sampler)."""
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return out


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (GGML_GELU_FP16): 0 for x <= -10, x for x >= 10, else the tanh GELU of fp16(x) rounded
    to fp16 (its 65,536-entry table)."""
    table = F.gelu(x.half().to(x.dtype), approximate="tanh").half().to(x.dtype)
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


@torch.no_grad()
def logits_with(model, ids: list[int], activation=None, dtype=torch.float32) -> np.ndarray:
    """gpt2lab's logits of ``ids``, optionally with every MLP's activation replaced and in another dtype."""
    saved = [block.mlp.activation for block in model.transformer.h]
    if activation is not None:
        for block in model.transformer.h:
            block.mlp.activation = activation
    try:
        return model.to(dtype)(torch.tensor([ids]))[0].double().numpy()
    finally:
        model.float()
        for block, original in zip(model.transformer.h, saved, strict=True):
            block.mlp.activation = original


def f32_parity(llm_f32, model, ids: list[int]) -> list[str]:
    """llama.cpp f32 against gpt2lab computing ggml's GELU (the criterion), with the exact GELU's gap and the
    floor set by the fp16 table's rounding steps (gpt2lab fp32 vs fp64, both with ggml's GELU) beside it."""
    theirs = llama_logits(llm_f32, ids)
    ours = logits_with(model, ids, ggml_gelu)
    diff = float(np.abs(theirs - ours).max())
    exact = float(np.abs(theirs - logits_with(model, ids)).max())
    floor = float(np.abs(ours - logits_with(model, ids, ggml_gelu, torch.float64)).max())
    verdict = "PASS" if diff <= LOGIT_TOLERANCE else "FAIL"
    return [
        f"{verdict} f32 logits: max |llama.cpp - gpt2lab with ggml's GELU| = {diff:.2e} over {len(ids)} positions",
        f"info f32 logits: against gpt2lab's exact GELU {exact:.2e}; gpt2lab with ggml's GELU, fp32 vs fp64: "
        f"{floor:.2e}; max |logit| = {float(np.abs(ours).max()):.2f}",
    ]


def gelu_reproduced(path: Path, ids: list[int], threads: int) -> str:
    """ggml's layer-0 GELU, read from llama.cpp's graph, against ``ggml_gelu`` of its own input: bit for bit."""
    tensors = capture(path, ids, {"ffn_up_b-0", "ffn_gelu-0"}, threads)
    x, y = torch.from_numpy(tensors["ffn_up_b-0"]), torch.from_numpy(tensors["ffn_gelu-0"])
    unequal = int((ggml_gelu(x) != y).sum())
    exact = float((F.gelu(x.double(), approximate="tanh") - y.double()).abs().max())
    verdict = "PASS" if unequal == 0 else "FAIL"
    return (
        f"{verdict} ggml's GELU reproduced: {x.numel() - unequal} of {x.numel()} layer-0 values equal, bit for bit"
        f" (its largest difference to the exact tanh GELU: {exact:.2e})"
    )


def f32_graph_parity(model, folder: Path, ids: list[int], threads: int) -> str:
    """The same model with every c_fc bias raised by 20, so every GELU input is >= 10 and ggml's GELU returns it
    unchanged: what is left of the gap is the rest of llama.cpp's graph (attention, LayerNorm, products)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.bias.add_(20.0)
    try:
        path = folder / "m-f32-gelu-passthrough.gguf"
        model.export_gguf(path, gpt2_bpe(), "f32")
        llm = open_llama(path, threads, f32_cache=True)
        diff = float(np.abs(llama_logits(llm, ids) - logits_with(model, ids)).max())
    finally:
        model.load_state_dict(state)
    verdict = "PASS" if diff <= GRAPH_TOLERANCE else "FAIL"
    return f"{verdict} f32 graph outside GELU (every GELU input >= 10): max difference {diff:.2e}"


def check_parity(llm_f32, llm_q8, model) -> list[str]:
    """The parity lines; each starts with PASS or FAIL."""
    lines = []
    ours = gpt2_bpe().encode_ordinary(TEXT)
    theirs = llm_f32.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
    lines.append(
        f"{'PASS' if theirs == ours else 'FAIL'} tokenizer: llama.cpp {len(theirs)} tokens, gpt2lab {len(ours)}"
    )
    ids = parity_ids()
    with torch.no_grad():
        reference = model(torch.tensor([ids]))[0].numpy()
    lines += f32_parity(llm_f32, model, ids)
    q8_diff = float(np.abs(llama_logits(llm_q8, ids) - reference).max())
    lines.append(f"info q8_0 logits: max |llama.cpp - gpt2lab fp32| = {q8_diff:.2e}")
    steps = max(64, GREEDY_STEPS)
    greedy = model.generate(torch.tensor([prompt_ids()]), steps, temperature=0)[0, PROMPT:].tolist()
    for name, llm in (("f32", llm_f32), ("q8_0", llm_q8)):
        tokens = llama_greedy(llm, prompt_ids(), steps)
        same = next((i for i, (a, b) in enumerate(zip(tokens, greedy, strict=True)) if a != b), steps)
        verdict = "PASS" if same >= GREEDY_STEPS else "FAIL"
        lines.append(f"{verdict} {name} greedy: first {same} of {steps} tokens equal gpt2lab fp32's")
    return lines


def decoders(llm_f32, llm_q8, model, int8_model, reference, new_tokens: int) -> dict:
    prompt = prompt_ids()
    idx = torch.tensor([prompt])
    return {
        "llama.cpp f32": lambda: llama_greedy(llm_f32, prompt, new_tokens),
        "llama.cpp q8_0": lambda: llama_greedy(llm_q8, prompt, new_tokens),
        "gpt2lab fp32": lambda: model.generate(idx, new_tokens, temperature=0),
        "gpt2lab int8": lambda: int8_model.generate(idx, new_tokens, temperature=0),
        # `gpt2lab generate --compile`: the steps after the prompt through one compiled graph
        "gpt2lab fp32 compiled": lambda: model.generate(idx, new_tokens, temperature=0, compile=True),
        "gpt2lab int8 compiled": lambda: int8_model.generate(idx, new_tokens, temperature=0, compile=True),
        "transformers fp32": lambda: reference.generate(
            idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parity-only", action="store_true", help="the parity checks alone, no speed runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags'])}; load average at start: {load_average()}")
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {args.threads} threads\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_random_reference(folder / "hf")
        model = load_gpt2lab(folder / "hf")
        for file_type in ("f32", "q8_0"):
            summary = model.export_gguf(folder / f"m-{file_type}.gguf", gpt2_bpe(), file_type)
            size = (folder / f"m-{file_type}.gguf").stat().st_size / 2**20
            print(f"exported {file_type}: {summary.describe()}, {size:.0f} MiB")
        exact = [open_llama(folder / f"m-{t}.gguf", args.threads, f32_cache=True) for t in ("f32", "q8_0")]
        lines = check_parity(*exact, model)
        del exact
        lines.append(gelu_reproduced(folder / "m-f32.gguf", parity_ids(), args.threads))
        lines.append(f32_graph_parity(model, folder, parity_ids(), args.threads))
        print("\n".join(["", *lines, ""]))
        if args.parity_only:
            return 1 if any(line.startswith("FAIL") for line in lines) else 0
        llm_f32 = open_llama(folder / "m-f32.gguf", args.threads)
        llm_q8 = open_llama(folder / "m-q8_0.gguf", args.threads)
        reference = load_reference(folder / "hf")
        contenders = decoders(llm_f32, llm_q8, model, load_gpt2lab(folder / "hf", "int8"), reference,
                              args.new_tokens)  # fmt: skip
        times = alternate(contenders, args.repeats)
    base = args.new_tokens / median(times["llama.cpp q8_0"])
    print(f"greedy decoding, prompt {PROMPT}, {args.new_tokens} new tokens, batch 1 (median of {args.repeats}):")
    for name, seconds in times.items():
        rate = args.new_tokens / median(seconds)
        print(f"  {name:<18} {rate:7.1f} tokens/s   {rate / base:5.2f}x llama.cpp q8_0")
    print(f"\nload average at end: {load_average()}")
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
