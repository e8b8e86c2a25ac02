"""``gpt2lab`` subcommands that use a model: generate, convert, export, info, eval, harness. Each is an ``add_*``
(arguments) and a ``cmd_*`` (action) pair; the work itself lives in the library modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpt2lab.analysis import format_report, model_report
from gpt2lab.cli import arguments as arg
from gpt2lab.cli.kernel_report import format_kernel_report, kernel_report
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval.hellaswag import accuracies, evaluate_hellaswag, load_examples
from gpt2lab.eval.loss import evaluate, load_tokens, write_by_position
from gpt2lab.files import remove_stale_temp_files
from gpt2lab.generation import stream_text
from gpt2lab.loading import load_model, load_model_and_tokenizer
from gpt2lab.outputs import CONFIG_FILE, EVAL, MODEL, TOKENIZER_FILE, WEIGHTS_FILE, clear_outputs, guard_output
from gpt2lab.tokenizer import load_tokenizer, save_tokenizer
from gpt2lab.train.config import load_model_config, parse_overrides

DTYPES = ("float32", "bfloat16")  # names gpt2lab.config.parse_dtype reads
INFERENCE_DTYPES = (*DTYPES, "int8")  # int8: weights quantized after loading (gpt2lab.kernels.quantize)
GGUF_TYPES = ("f32", "f16", "q8_0")  # gpt2lab.checkpoints.gguf_export.GGUF_TYPES, without importing numpy here


# ---------------------------------------------------------------------------------------- generate


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streaming tokens as they come")
    p.add_argument("--model", default="gpt2", help="hub id, local folder/file, TF checkpoint or gpt2lab run")
    p.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    p.add_argument("--max-new-tokens", type=arg.nonnegative_int("max_new_tokens"), default=100)
    p.add_argument(
        "--temperature", type=arg.nonnegative_float("temperature", " (0 is greedy)"), default=1.0, help="0 is greedy"
    )
    p.add_argument("--top-k", type=arg.positive_int("top_k"), default=None)
    p.add_argument("--top-p", type=arg.probability("top_p"), default=None)
    p.add_argument("--seed", type=arg.seed, default=None)
    p.add_argument(
        "--stop",
        type=arg.stop_string,
        action="append",
        default=None,
        help=r"stop string (repeatable; reads \n, \t, \r and \\ as escapes)",
    )
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="float32", help="weight dtype (int8: CPU only)")
    p.add_argument("--device", type=arg.device, default="cpu")
    p.add_argument(
        "--compile", action="store_true", help="decode through one compiled graph (pays off over long generations)"
    )
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    pieces = stream_text(
        model, tokenizer, prompt, args.max_new_tokens, stop=args.stop, compile=args.compile, **sampling
    )
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------- convert


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a multi-head checkpoint into GQA/MQA by mean-pooling K/V heads")
    p.add_argument("--model", required=True, help="run folder, training checkpoint or any model generate reads")
    p.add_argument("--n-kv-head", type=arg.positive_int("n_kv_head"), required=True)
    p.add_argument("--out", required=True, help="folder for the converted model (gpt2lab format)")
    p.add_argument("--overwrite", action="store_true", help="replace the model the --out folder holds")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    _guard_model_folder(args.out, args.overwrite)
    model, tokenizer = load_model_and_tokenizer(args.model)
    converted = model.convert_to_gqa(args.n_kv_head)
    converted.save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)
    _clear_model_folder(args.out)
    heads = f"{model.config.n_kv_head} -> {args.n_kv_head} key/value heads"
    print(f"converted {heads}; {model.num_params():,} -> {converted.num_params():,} parameters; saved to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------- export


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model for transformers (hub layout: GPT-2, GPTBigCode or Starcoder2) or llama.cpp (GGUF)",
    )
    p.add_argument("--model", required=True, help="run folder, training checkpoint or any model generate reads")
    p.add_argument("--out", required=True, help="hf: folder for config.json + model.safetensors; gguf: the .gguf file")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf (transformers) or gguf (llama.cpp)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="hf: dtype of the exported weights (float32)")
    p.add_argument("--type", choices=GGUF_TYPES, default=None, help="gguf: f32, f16 or q8_0 matrices (f32)")
    p.add_argument("--overwrite", action="store_true", help="replace the model --out holds (a folder, or a .gguf file)")
    p.set_defaults(func=cmd_export)


def _guard_model_folder(out: str, overwrite: bool) -> None:
    """Before the model is read: --out must be new, empty, or (with --overwrite) a model's folder."""
    guard_output(out, MODEL, overwrite=overwrite)


def _clear_model_folder(out: str) -> None:
    """After writing: what an earlier model in --out left that this one did not rewrite (shards of a sharded
    model, an index) goes, and temp files of a killed earlier write; written files and others' files stay."""
    clear_outputs(out, MODEL, keep=(CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE))
    remove_stale_temp_files(out)


def cmd_export(args) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    if args.type is not None:
        raise GPT2LabError("--type is for --format gguf; the hub layout takes --dtype")
    _guard_model_folder(args.out, args.overwrite)
    model = load_model(args.model, dtype=args.dtype or "float32")  # plain weights: export runs no kernel
    model_type = model.export_hf(args.out)
    save_tokenizer(load_tokenizer(args.model), args.out)  # a character model's export reads and writes characters too
    _clear_model_folder(args.out)
    print(f"exported as transformers' '{model_type}' to {args.out}")
    return 0


def _export_gguf(args) -> int:
    """One .gguf file: refused before the model is read when it is a folder, or exists without --overwrite."""
    if args.dtype is not None:
        raise GPT2LabError("--dtype is for --format hf; GGUF takes --type (f32, f16 or q8_0)")
    out = Path(args.out)
    if out.is_dir():
        raise GPT2LabError(f"{out} is a folder; --format gguf writes one file: name it, e.g. {out / 'model.gguf'}")
    if out.exists() and not args.overwrite:
        raise GPT2LabError(f"{out} exists; pass --overwrite to replace it")
    model = load_model(args.model, dtype="float32")
    summary = model.export_gguf(out, load_tokenizer(args.model), args.type or "f32", overwrite=args.overwrite)
    print(f"exported as {summary.describe()} to {out}")
    return 0


# ---------------------------------------------------------------------------------------- info


def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs per token and KV-cache size of a config, vs GPT-2 of its size")
    p.add_argument("--config", default="gpt2", help="preset name, JSON/TOML config file, or a model folder")
    p.add_argument(
        "--set", action="append", default=None, metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    p.add_argument(
        "--seq-len", type=arg.positive_int("seq_len"), default=None, help="sequence length T (default: block_size)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="bytes of weights and cache entries")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="measure and list the CPU kernels gpt2lab picks for this config (and the training dtype)",
    )
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    config = load_model_config(args.config, parse_overrides(args.set))
    if args.kernels:
        report = kernel_report(config)
        print(json.dumps(report, indent=2) if args.json else format_kernel_report(report))
        return 0
    report = model_report(config, args.seq_len, args.dtype)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ---------------------------------------------------------------------------------------- eval


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on held-out text; HellaSwag accuracy")
    p.add_argument("--model", required=True, help="run folder, training checkpoint, or any model generate reads")
    p.add_argument("--data", default=None, help="a text file, or a prepared folder (its val split)")
    p.add_argument("--hellaswag", default=None, help="HellaSwag jsonl file, or 'val' (the official one, downloaded)")
    p.add_argument("--max-examples", type=arg.positive_int("max_examples"), default=None, help="HellaSwag: at most N")
    p.add_argument(
        "--context",
        type=arg.positive_int("context"),
        default=None,
        help="window length (default: the model's block_size)",
    )
    p.add_argument("--batch-size", type=arg.positive_int("batch_size"), default=8)
    p.add_argument(
        "--max-tokens", type=arg.positive_int("max_tokens"), default=None, help="evaluate at most this many tokens"
    )
    p.add_argument("--by-position", action="store_true", help="write loss_by_position.csv/.png")
    p.add_argument("--out", default=None, help="folder for the by-position files (default: the model folder or .)")
    p.add_argument("--overwrite", action="store_true", help="replace the by-position files the --out folder holds")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="float32", help="weight dtype (int8: CPU only)")
    p.add_argument("--device", type=arg.device, default="cpu")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    if args.data is None and args.hellaswag is None:
        raise GPT2LabError("eval needs --data, --hellaswag, or both")
    out = args.out or (args.model if Path(args.model).is_dir() else ".")
    if args.by_position:  # before minutes of evaluation, not after
        guard_output(out, EVAL, overwrite=args.overwrite)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    if args.hellaswag is not None:
        _eval_hellaswag(model, args.hellaswag, args.max_examples)
    if args.data is None:
        return 0
    tokens, n_bytes, source = load_tokens(args.data, tokenizer)
    result = evaluate(model, tokens, args.context, args.batch_size, args.max_tokens, tokenizer=tokenizer)
    print(f"data: {source} ({len(tokens):,} tokens, {n_bytes:,} bytes); evaluated {result.tokens:,} tokens")
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  bits/byte {result.bits_per_byte:.4f}")
    if args.by_position:
        csv_path, png_path = write_by_position(result, out, trained_context=model.config.block_size)
        print(f"loss by position: {csv_path}, {png_path}")
    return 0


def _eval_hellaswag(model, source: str, limit: int | None) -> None:
    examples = load_examples(source, limit, vocab_size=model.config.vocab_size)
    result = accuracies(evaluate_hellaswag(model, examples, model.config.block_size, progress=True))
    print(
        f"hellaswag: acc_norm {result['hellaswag_acc_norm']:.4f} (lowest mean loss per ending token, llm.c's style)  "
        f"acc {result['hellaswag_acc']:.4f} (lowest summed loss)  on {len(examples):,} examples"
    )


# ---------------------------------------------------------------------------------------- harness


def add_harness(sub) -> None:
    p = sub.add_parser(
        "harness",
        help="run EleutherAI's lm-evaluation-harness tasks on a model (needs pip install 'gpt2lab[harness]')",
    )
    p.add_argument("--model", default="gpt2", help="run folder, training checkpoint, or any model generate reads")
    p.add_argument("--tasks", required=True, help="comma-separated harness tasks, e.g. lambada_openai,wikitext")
    p.add_argument("--limit", type=arg.positive_int("limit"), default=None, help="at most this many examples per task")
    p.add_argument("--num-fewshot", type=arg.nonnegative_int("num_fewshot"), default=None)
    p.add_argument("--batch-size", type=arg.positive_int("batch_size"), default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (scores are float32)")
    p.add_argument("--device", type=arg.device, default="cpu")
    p.add_argument("--include-path", action="append", default=None, help="folder of task YAML files (repeatable)")
    p.add_argument(
        "--bootstrap-iters",
        type=arg.nonnegative_int("bootstrap_iters"),
        default=0,
        help="resamples for standard errors (0: none; lm_eval's default is 100000)",
    )
    p.add_argument("--output", default=None, help="write the scores as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=cmd_harness)


def cmd_harness(args) -> int:
    if args.output and Path(args.output).exists() and not args.overwrite:  # before minutes of work, not after
        raise GPT2LabError(f"{args.output} exists; pass --overwrite to replace it")
    # eval.harness needs the optional lm-eval package at import time: imported only when asked for
    from gpt2lab.eval.harness import format_results, run_harness, write_results

    results = run_harness(
        args.model,
        args.tasks.split(","),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        include_path=args.include_path,
        bootstrap_iters=args.bootstrap_iters,
    )
    print(format_results(results))
    if args.output:
        write_results(results, args.output)
        print(f"scores: {args.output}")
    return 0
