"""The ``gpt2lab`` command line. Each subcommand is an ``add_*`` (arguments) and a ``cmd_*`` (action) pair;
the work itself lives in the library modules."""

from __future__ import annotations

import argparse
import os
import sys

from . import arguments as arg
from .config import GPT2LabError

DTYPES = ("float32", "bfloat16")  # names gpt2lab.precision.parse_dtype reads
INFERENCE_DTYPES = (*DTYPES, "int8")  # int8: weights quantized after loading (gpt2lab.quantize)


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
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stop", type=arg.stop_string, action="append", default=None, help=r"stop string (repeatable; \n, \t escapes)"
    )
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="float32", help="weight dtype (int8: CPU only)")
    p.add_argument("--device", type=arg.device, default="cpu")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .generation import stream_text
    from .run_state import load_model_and_tokenizer

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    pieces = stream_text(model, tokenizer, prompt, args.max_new_tokens, stop=args.stop, **sampling)
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
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .run_state import load_model_and_tokenizer
    from .tokenizer import save_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    converted = model.convert_to_gqa(args.n_kv_head)
    converted.save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)
    heads = f"{model.config.n_kv_head} -> {args.n_kv_head} key/value heads"
    print(f"converted {heads}; {model.num_params():,} -> {converted.num_params():,} parameters; saved to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------- export


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model in the hub layout transformers loads (as GPT-2, GPTBigCode or Starcoder2)"
    )
    p.add_argument("--model", required=True, help="run folder, training checkpoint or any model generate reads")
    p.add_argument("--out", required=True, help="folder for config.json + model.safetensors")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the exported weights")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .run_state import load_model

    model_type = load_model(args.model, dtype=args.dtype).export_hf(args.out)
    print(f"exported as transformers' '{model_type}' to {args.out}")
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
    import json

    from .analysis import format_report, model_report
    from .train_config import load_model_config, parse_overrides

    config = load_model_config(args.config, parse_overrides(args.set))
    if args.kernels:
        from .kernel_report import format_kernel_report, kernel_report

        report = kernel_report(config)
        print(json.dumps(report, indent=2) if args.json else format_kernel_report(report))
        return 0
    report = model_report(config, args.seq_len, args.dtype)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ---------------------------------------------------------------------------------------- prepare


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text into train/val token files (shards for large corpora)")
    p.add_argument(
        "source",
        nargs="+",
        help="text file(s) or folder, pydoc, shakespeare; .parquet/.jsonl/.arrow files or folders; hf:NAME",
    )
    p.add_argument("--out", required=True, help="folder for the token files and meta.json")
    p.add_argument(
        "--val-fraction", type=arg.fraction("val_fraction"), default=None, help="text sources: tail held out (0.1)"
    )
    p.add_argument(
        "--threads", type=arg.positive_int("threads"), default=None, help="tokenizer threads/processes (all cores)"
    )
    shards = p.add_argument_group("corpora at scale (parquet, jsonl, arrow, hf:NAME, or --shard-tokens)")
    shards.add_argument("--text-column", default="text", help="the column holding the text (default: text)")
    shards.add_argument("--hf-config", default=None, help="hf: the dataset's configuration (e.g. sample-10BT)")
    shards.add_argument("--split", default="train", help="hf: the dataset split (default: train)")
    shards.add_argument("--hf-revision", default=None, help="hf: a branch or commit, e.g. refs/convert/parquet")
    shards.add_argument("--shard-tokens", type=arg.positive_int("shard_tokens"), default=None, help="(100,000,000)")
    shards.add_argument("--val-tokens", type=arg.positive_int("val_tokens"), default=None, help="(10,000,000)")
    from .tokenizer import TOKENIZERS

    p.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="gpt2",
        help="gpt2: GPT-2's BPE; char: one token per character of the corpus",
    )
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    from .corpus_sources import SourceOptions, is_table_source

    if any(map(is_table_source, args.source)) or args.shard_tokens or args.val_tokens:
        from .shards import SHARD_TOKENS, VAL_TOKENS, prepare_shards

        if args.val_fraction is not None:
            raise GPT2LabError("a sharded prepare holds out --val-tokens (the first documents), not --val-fraction")
        if args.tokenizer != "gpt2":
            raise GPT2LabError("a sharded prepare writes GPT-2 tokens; --tokenizer char is for text files")
        options = SourceOptions(args.text_column, args.hf_config, args.split, args.hf_revision)
        sizes = dict(shard_tokens=args.shard_tokens or SHARD_TOKENS, val_tokens=args.val_tokens or VAL_TOKENS)
        meta = prepare_shards(args.source, args.out, options, workers=args.threads, **sizes)
        shards = f" in {len(meta['shards']['train'])} train shard(s) + {len(meta['shards']['val'])} val"
    else:
        from .data import prepare

        fraction = args.val_fraction or 0.1
        meta = prepare(args.source, args.out, val_fraction=fraction, num_threads=args.threads, tokenizer=args.tokenizer)
        shards = ""
    print(
        f"{meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta.get('tokenizer', 'gpt2')}, vocabulary "
        f"{meta['vocab_size']:,}): train {meta['train_tokens']:,}, val {meta['val_tokens']:,}{shards} -> {args.out}"
    )
    return 0


# ---------------------------------------------------------------------------------------- train


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune (one process, or DDP/FSDP under torchrun)")
    p.add_argument("--config", default=None, help="TOML file (configs/*.toml); defaults are the demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder exactly")
    p.add_argument("--overwrite", action="store_true", help="start again in a folder that holds a run (its files go)")
    p.add_argument(
        "--allow-changes", action="store_true", help="with --resume: accept settings that differ from the run's"
    )
    p.add_argument("--out", default=None, help="run folder (overrides run.out_dir)")
    p.add_argument("--plan", action="store_true", help="train nothing: print the run's tokens, FLOPs, memory, time")
    _add_plan_options(p)
    p.set_defaults(func=cmd_train)


def _add_plan_options(p) -> None:
    p.add_argument("--gpus", type=arg.positive_int("gpus"), default=1, help="plan: number of GPUs (default 1)")
    p.add_argument("--gpu", action="append", default=None, help="plan: A100, H100 or H200 (repeatable; default all)")
    p.add_argument("--mfu", type=arg.fraction("mfu"), default=0.4, help="plan: model FLOPs utilisation (default 0.4)")
    p.add_argument("--json", action="store_true", help="plan: print it as JSON")


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="a training config's tokens, FLOPs, memory per GPU and wall time; trains nothing")
    p.add_argument("--config", default=None, help="TOML file (configs/*.toml); defaults are the demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)")
    _add_plan_options(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    import json

    from .plan import format_plan, plan
    from .train_config import load_config

    result = plan(load_config(args.config, args.set), gpus=args.gpus, mfu=args.mfu, gpu_names=args.gpu)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _report_run(summary: dict) -> int:
    """Print the outcome once (rank 0); a run stopped by a signal exits 128 + signal number."""
    if int(os.environ.get("RANK", "0")) == 0:
        if summary["stopped"]:
            print(
                f"stopped at step {summary['step']}; checkpoint saved in {summary['out_dir']}: continue with --resume"
            )
        elif "val_loss" in summary:
            print(
                f"step {summary['step']}: val loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.1f}); "
                f"model saved in {summary['out_dir']}"
            )
    return 128 + summary["signal"] if summary["stopped"] else 0


def cmd_train(args) -> int:
    from .train_config import load_config
    from .training import train

    if args.plan:
        return cmd_plan(args)
    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.out_dir = args.out
    return _report_run(train(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes))


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
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="float32", help="weight dtype (int8: CPU only)")
    p.add_argument("--device", type=arg.device, default="cpu")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from pathlib import Path

    from .evaluation import evaluate, load_tokens, write_by_position
    from .run_state import load_model_and_tokenizer

    if args.data is None and args.hellaswag is None:
        raise GPT2LabError("eval needs --data, --hellaswag, or both")
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
        out = args.out or (args.model if Path(args.model).is_dir() else ".")
        csv_path, png_path = write_by_position(result, out, trained_context=model.config.block_size)
        print(f"loss by position: {csv_path}, {png_path}")
    return 0


def _eval_hellaswag(model, source: str, limit: int | None) -> None:
    from .hellaswag import accuracies, evaluate_hellaswag, load_examples

    examples = load_examples(source, limit, vocab_size=model.config.vocab_size)
    result = accuracies(evaluate_hellaswag(model, examples, model.config.block_size, progress=True))
    print(
        f"hellaswag: acc_norm {result['hellaswag_acc_norm']:.4f} (lowest mean loss per ending token, llm.c's style)  "
        f"acc {result['hellaswag_acc']:.4f} (lowest summed loss)  on {len(examples):,} examples"
    )


# ---------------------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="train a character-level GPT on the bundled Tiny Shakespeare (offline, ~2 minutes), then sample"
    )
    p.add_argument(
        "--pretrained", default=None, help="fine-tune this checkpoint (hub id or path) on the Python docs instead"
    )
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument(
        "--data",
        default=None,
        help="prepared data folder, made on first use (default: data/shakespeare-char; data/pydoc with --pretrained)",
    )
    p.add_argument("--max-iters", type=arg.positive_int("max_iters"), default=None)
    p.add_argument(
        "--prompt", default=None, help="sample prompt (default: 'ROMEO:\\n'; 'The for statement' with --pretrained)"
    )
    p.add_argument("--overwrite", action="store_true", help="train again in a run folder that holds a run")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, args.data, args.pretrained, args.max_iters, prompt=args.prompt, overwrite=args.overwrite)


# ---------------------------------------------------------------------------------------- study


def add_study(sub) -> None:
    p = sub.add_parser("study", help="train every variant of a suite, measure them, write a report with plots")
    p.add_argument("--suite", required=True, help="suite TOML (see configs/study/)")
    p.add_argument("--out", required=True, help="folder for runs, CSVs, plots and report.md (re-run to resume)")
    p.add_argument("--data", default=None, help="text file, folder or named dataset; overrides the suite's")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a suite key, e.g. train.max_iters=10"
    )
    p.set_defaults(func=cmd_study)


def cmd_study(args) -> int:
    from .study import run_study
    from .study_suite import load_suite

    report = run_study(load_suite(args.suite, data=args.data, overrides=args.set), args.out)
    print(f"report: {report}")
    return 0


# ---------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``gpt2lab generate: error: ...``) instead of two."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt2lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [
    add_generate, add_convert, add_export, add_info, add_prepare, add_train, add_plan, add_eval, add_demo, add_study
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except GPT2LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (gpt2lab generate ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
