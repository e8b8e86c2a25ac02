"""The ``gpt2lab`` command line: one parser, every subcommand's ``add_*`` from :mod:`gpt2lab.cli.models`
(generate, convert, export, info, eval, harness) and :mod:`gpt2lab.cli.runs` (prepare, train, plan, demo, study),
and one place where errors become a single line and an exit status."""

from __future__ import annotations

import argparse
import os
import sys

from gpt2lab.cli.models import add_convert, add_eval, add_export, add_generate, add_harness, add_info
from gpt2lab.cli.runs import add_demo, add_plan, add_prepare, add_study, add_train
from gpt2lab.cli.serve import add_serve
from gpt2lab.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, GPT2LabError


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``gpt2lab generate: error: ...``) instead of two."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt2lab", description="GPT-2 from scratch: generate, train, evaluate, study variants.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [
    add_generate,
    add_convert,
    add_export,
    add_info,
    add_prepare,
    add_train,
    add_plan,
    add_eval,
    add_harness,
    add_demo,
    add_study,
    add_serve,
]


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 bad input (:class:`GPT2LabError`, a missing file, argparse),
    74 an environment fault (:class:`EnvironmentFault`, any other ``OSError``: disk full, read-only,
    permissions), 130 interrupted, 128 + N a training stopped by signal N."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except GPT2LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader went away (gpt2lab generate ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except OSError as e:  # a fault of the machine that no reader or writer turned into a line of its own
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
