"""``gpt2lab`` subcommands that make data and runs: prepare, train, plan, demo, study. Each is an ``add_*``
(arguments) and a ``cmd_*`` (action) pair; the work itself lives in the library modules."""

from __future__ import annotations

import json
import os

from gpt2lab.cli import arguments as arg
from gpt2lab.cli.demo import run_demo
from gpt2lab.data.shards import SHARD_TOKENS, prepare_shards
from gpt2lab.data.sources import SourceOptions, is_table_source
from gpt2lab.data.tokens import prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.study.run import run_study
from gpt2lab.study.suite import load_suite
from gpt2lab.tokenizer import TOKENIZERS
from gpt2lab.train.config import load_config
from gpt2lab.train.loop import train
from gpt2lab.train.plan import format_plan, plan

# ---------------------------------------------------------------------------------------- prepare


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text into train/val token files (shards for large corpora)")
    p.add_argument(
        "source",
        nargs="+",
        help="text file(s) or folder, pydoc, shakespeare; .parquet/.jsonl/.arrow files or folders; hf:NAME",
    )
    p.add_argument("--out", required=True, help="folder for the token files and meta.json")
    p.add_argument("--overwrite", action="store_true", help="replace the prepared data the --out folder holds")
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
    shards.add_argument(
        "--val-tokens", type=arg.positive_int("val_tokens"), default=None, help="(min(10,000,000, 10%% of the corpus))"
    )
    p.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="gpt2",
        help="gpt2: GPT-2's BPE; char: one token per character of the corpus",
    )
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    if any(map(is_table_source, args.source)) or args.shard_tokens or args.val_tokens:
        if args.val_fraction is not None:
            raise GPT2LabError("a sharded prepare holds out --val-tokens (the first documents), not --val-fraction")
        if args.tokenizer != "gpt2":
            raise GPT2LabError("a sharded prepare writes GPT-2 tokens; --tokenizer char is for text files")
        options = SourceOptions(args.text_column, args.hf_config, args.split, args.hf_revision)
        sizes = dict(shard_tokens=args.shard_tokens or SHARD_TOKENS, val_tokens=args.val_tokens)
        meta = prepare_shards(args.source, args.out, options, workers=args.threads, overwrite=args.overwrite, **sizes)
        shards = f" in {len(meta['shards']['train'])} train shard(s) + {len(meta['shards']['val'])} val"
    else:
        fraction = args.val_fraction or 0.1
        meta = prepare(
            args.source,
            args.out,
            val_fraction=fraction,
            num_threads=args.threads,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
        )
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
    p.add_argument(
        "--from-saved-model",
        action="store_true",
        help="with --resume, for a run whose ckpt.pt is gone: continue from its saved model (fresh optimizer state)",
    )
    p.add_argument("--out", default=None, help="run folder (overrides run.out_dir)")
    p.add_argument(
        "--log-to",
        default=None,
        metavar="TRACKERS",
        help="also log to tensorboard, wandb and/or csv, comma-separated (overrides run.log_to)",
    )
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
    if args.plan:
        return cmd_plan(args)
    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.out_dir = args.out
    if args.from_saved_model and not args.resume:
        raise GPT2LabError("--from-saved-model continues a run: use it with --resume")
    if args.log_to is not None:
        cfg.log_to = [name.strip() for name in args.log_to.split(",") if name.strip()]
    options = dict(resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes)
    return _report_run(train(cfg, **options, from_saved_model=args.from_saved_model))


# ---------------------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a character-level GPT on the bundled Tiny Shakespeare (offline, ~4 CPU-minutes), then sample",
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
    p.add_argument(
        "--max-minutes",
        type=arg.nonnegative_float("max_minutes"),
        default=None,
        help="minutes: no run starts later, running ones checkpoint and stop; re-run to resume (0: report only)",
    )
    p.set_defaults(func=cmd_study)


def cmd_study(args) -> int:
    suite = load_suite(args.suite, data=args.data, overrides=args.set)
    report = run_study(suite, args.out, max_minutes=args.max_minutes)
    print(f"report: {report}")
    return 0
