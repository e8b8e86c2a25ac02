"""Command-line argument types: each value is checked where it enters, and a bad one is one line.

Each factory takes the name the library uses for the value (``top_p``) and returns the converter
argparse calls with the raw string. Raising ``argparse.ArgumentTypeError`` makes the CLI print
``gpt2lab CMD: error: argument --top-p: top_p must be in (0, 1], got 1.5`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

import torch

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _typed(name: str, kind: type, rule: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {rule}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):  # a huge int is no float
            raise argparse.ArgumentTypeError(f"{name} must be {rule}, got {text}")
        return value

    return convert


def positive_int(name: str) -> Callable[[str], int]:
    return _typed(name, int, "an integer >= 1", lambda v: v >= 1)


def nonnegative_int(name: str) -> Callable[[str], int]:
    return _typed(name, int, "an integer >= 0", lambda v: v >= 0)


def nonnegative_float(name: str, note: str = "") -> Callable[[str], float]:
    return _typed(name, float, f"a finite number >= 0{note}", lambda v: v >= 0)


def probability(name: str) -> Callable[[str], float]:
    return _typed(name, float, "in (0, 1]", lambda v: 0 < v <= 1)


def fraction(name: str) -> Callable[[str], float]:
    return _typed(name, float, "in (0, 1)", lambda v: 0 < v < 1)


def seed(text: str) -> int:
    """A seed in the range every RNG takes: [0, 2**32 - 1]."""
    return _typed("seed", int, "an integer in [0, 4294967295]", lambda v: 0 <= v <= 2**32 - 1)(text)


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N, mps."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda, cuda:N, mps)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"there is no {text} (this machine has {torch.cuda.device_count()} GPUs)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("MPS is not available on this machine")
    return text


def stop_string(text: str) -> str:
    r"""A stop string with the escapes a shell does not expand: \n, \t, \r and \\. Empty is refused."""
    value = re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)
    if not value:
        raise argparse.ArgumentTypeError("a stop string must not be empty")
    return value
