"""The ``gpt2lab`` command line. Each subcommand is an ``add_*`` (arguments) and a ``cmd_*`` (action) pair;
the work itself lives in the library modules."""

from __future__ import annotations

import argparse
import sys

import torch

from .config import GPT2LabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------- generate


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streaming tokens as they come")
    p.add_argument("--model", default="gpt2", help="hub id, local folder/file, TF checkpoint or gpt2lab run")
    p.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype for inference")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .generation import check_sampling, stream_text
    from .model import GPT
    from .tokenizer import load_tokenizer

    check_sampling(args.temperature, args.top_k, args.top_p)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = GPT.from_pretrained(args.model).to(device=args.device, dtype=DTYPES[args.dtype])
    tokenizer = load_tokenizer()
    sys.stdout.write(prompt)
    for piece in stream_text(
        model,
        tokenizer,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------- convert


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a multi-head checkpoint into GQA/MQA by mean-pooling K/V heads")
    p.add_argument("--model", required=True, help="checkpoint to convert (any format from_pretrained reads)")
    p.add_argument("--n-kv-head", type=int, required=True)
    p.add_argument("--out", required=True, help="folder for the converted model (gpt2lab format)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .model import GPT

    model = GPT.from_pretrained(args.model)
    converted = model.convert_to_gqa(args.n_kv_head)
    converted.save_pretrained(args.out)
    print(
        f"converted {model.config.n_kv_head} -> {args.n_kv_head} key/value heads; "
        f"{model.num_params():,} -> {converted.num_params():,} parameters; saved to {args.out}"
    )
    return 0


# ---------------------------------------------------------------------------------------- info


def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs per token and KV-cache size of a config, vs GPT-2 of its size")
    p.add_argument("--config", default="gpt2", help="preset name, JSON/TOML config file, or a model folder")
    p.add_argument(
        "--set", action="append", default=None, metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="sequence length T (default: block_size)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="bytes of weights and cache entries")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    import json

    from .analysis import format_report, load_config, model_report, parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    report = model_report(config, args.seq_len, args.dtype)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ---------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [add_generate, add_convert, add_info]


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
