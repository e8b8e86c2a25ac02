"""The one kind of error a user sees, and the checks that raise it: one line that names the problem."""

from __future__ import annotations

import difflib
import math
from typing import Any


class GPT2LabError(ValueError):
    """A user-facing error: the message is one line that names the problem.

    The CLI prints it as ``error: <message>`` and exits with status 2 (:data:`EXIT_BAD_INPUT`) instead of
    a traceback.
    """

    exit_code = 2


class EnvironmentFault(GPT2LabError):
    """The machine, not the input, failed: a full disk, a read-only or forbidden folder (an ``OSError`` on a
    write). The CLI prints it as one line too, and exits with :data:`EXIT_ENVIRONMENT` so that scripts can
    retry these and not bad input."""

    exit_code = 74  # EX_IOERR of BSD's sysexits.h


EXIT_BAD_INPUT = GPT2LabError.exit_code
EXIT_ENVIRONMENT = EnvironmentFault.exit_code


def os_fault(action: str, path, err: OSError) -> EnvironmentFault:
    """``cannot ACTION PATH: CAUSE`` for an ``OSError``; raise it ``from err``."""
    return EnvironmentFault(f"cannot {action} {path}: {err.strerror or err}")


def closest_hint(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else an empty string."""
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is an int to Python, never a size to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(
    name: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """Refuse with one line a value that is not a finite number in [low, high) (or (low, high) if low_open)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"< {high:g}"
        bounds = " and ".join(part for part in (lo, hi) if part)
        raise GPT2LabError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")


MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes at most 32 bits; torch takes these too


def check_seed(name: str, value: Any) -> None:
    """A seed every RNG gpt2lab seeds accepts: an integer in [0, 2**32 - 1]."""
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise GPT2LabError(f"{name} must be an integer in [0, {MAX_SEED}] (the range of a 32-bit seed), got {value!r}")
