"""The ``gpt2lab`` command line. Each subcommand is an ``add_*`` (arguments) and a ``cmd_*`` (action) pair;
the work itself lives in the library modules."""

from __future__ import annotations

import argparse
import os
import sys

from . import arguments as arg
from .config import GPT2LabError

DTYPES = ("float32", "bfloat16")  # names gpt2lab.precision.parse_dtype reads


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
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype for inference")
    p.add_argument("--device", type=arg.device, default="cpu")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .generation import stream_text
    from .run_state import load_model
    from .tokenizer import load_tokenizer

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    pieces = stream_text(model, load_tokenizer(), prompt, args.max_new_tokens, stop=args.stop, **sampling)
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
    from .run_state import load_model

    model = load_model(args.model)
    converted = model.convert_to_gqa(args.n_kv_head)
    converted.save_pretrained(args.out)
    heads = f"{model.config.n_kv_head} -> {args.n_kv_head} key/value heads"
    print(f"converted {heads}; {model.num_params():,} -> {converted.num_params():,} parameters; saved to {args.out}")
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
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    import json

    from .analysis import format_report, model_report
    from .train_config import load_model_config, parse_overrides

    config = load_model_config(args.config, parse_overrides(args.set))
    report = model_report(config, args.seq_len, args.dtype)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ---------------------------------------------------------------------------------------- prepare


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text into train.bin/val.bin for training")
    p.add_argument("source", nargs="+", help="text file(s), a folder of text files, or a dataset: pydoc, shakespeare")
    p.add_argument("--out", required=True, help="folder for train.bin, val.bin and meta.json")
    p.add_argument(
        "--val-fraction",
        type=arg.fraction("val_fraction"),
        default=0.1,
        help="tail of the token stream held out for validation",
    )
    p.add_argument(
        "--threads", type=arg.positive_int("threads"), default=None, help="tokenizer threads (default: all cores)"
    )
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    from .data import prepare

    meta = prepare(args.source, args.out, val_fraction=args.val_fraction, num_threads=args.threads)
    print(
        f"{meta['documents']:,} documents, {meta['tokens']:,} tokens: "
        f"train {meta['train_tokens']:,}, val {meta['val_tokens']:,} -> {args.out}"
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
    p.set_defaults(func=cmd_train)


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

    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.out_dir = args.out
    return _report_run(train(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes))


# ---------------------------------------------------------------------------------------- eval


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on held-out text")
    p.add_argument("--model", required=True, help="run folder, training checkpoint, or any model generate reads")
    p.add_argument("--data", required=True, help="a text file, or a prepared folder (its val split)")
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
    p.add_argument("--device", type=arg.device, default="cpu")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from pathlib import Path

    from .evaluation import evaluate, load_tokens, write_by_position
    from .run_state import load_model

    model = load_model(args.model, device=args.device)
    tokens, n_bytes, source = load_tokens(args.data)
    result = evaluate(model, tokens, args.context, args.batch_size, args.max_tokens)
    print(f"data: {source} ({len(tokens):,} tokens, {n_bytes:,} bytes); evaluated {result.tokens:,} tokens")
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  bits/byte {result.bits_per_byte:.4f}")
    if args.by_position:
        out = args.out or (args.model if Path(args.model).is_dir() else ".")
        csv_path, png_path = write_by_position(result, out, trained_context=model.config.block_size)
        print(f"loss by position: {csv_path}, {png_path}")
    return 0


# ---------------------------------------------------------------------------------------- harness


def add_harness(sub) -> None:
    p = sub.add_parser("harness", help="run EleutherAI's lm-evaluation-harness tasks on a model (pip install lm-eval)")
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
    from pathlib import Path

    if args.output and Path(args.output).exists() and not args.overwrite:  # before minutes of work, not after
        raise GPT2LabError(f"{args.output} exists; pass --overwrite to replace it")
    from .harness import format_results, run_harness, write_results

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


# ---------------------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a small model on the bundled Python docs (offline, minutes), then sample")
    p.add_argument("--pretrained", default=None, help="fine-tune this checkpoint (hub id or path) instead")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--data", default="data/pydoc", help="prepared data folder (made on first use)")
    p.add_argument("--max-iters", type=arg.positive_int("max_iters"), default=None)
    p.add_argument("--prompt", default="The for statement")
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


COMMANDS = [add_generate, add_convert, add_info, add_prepare, add_train, add_eval, add_harness, add_demo, add_study]


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
