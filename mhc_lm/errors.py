"""The errors mhc-lm raises on purpose, the checks that raise them, and the exit code each one ends a run
with: a leaf module that every layer may import.

| exit code | meaning |
|---|---|
| 0 | done |
| 1 | failed during work: a bug (Python's traceback), or the environment (a full disk: one line) |
| 2 | bad input found before any work (config value, file, path, launch environment): one line on stderr |
| 75 | preempted (SIGTERM / SIGUSR1): every rank checkpointed; RUN/continue.sh continues the run |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: try again later; what a scheduler requeues on


class MhcError(Exception):
    """An expected failure: `mhc_lm.cli` prints `prefix: message` as one line and exits with `exit_code`."""

    exit_code = EXIT_FAILED
    prefix = "error"


class ConfigError(MhcError, ValueError):
    """A bad option value. The message reads `option=value: what is allowed`."""

    exit_code = EXIT_BAD_INPUT


def fail(option: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{option}={value!r}: {allowed}")


def check_choice(option: str, value: Any, choices) -> None:
    if value not in choices:
        fail(option, value, f"allowed: {', '.join(map(str, choices))}")


def check_min(option: str, value: Any, minimum: int | float) -> None:
    if value is None or not value >= minimum:  # `not >=`: NaN is refused too
        fail(option, value, f"allowed: a number >= {minimum}")


def check_range(option: str, value: Any, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> None:
    """`value` in the interval from `low` to `high`, each end closed unless said open."""
    above = value is not None and (value > low if low_open else value >= low)
    below = value is not None and (value < high if high_open else value <= high)
    if not (above and below):
        fail(option, value, f"allowed: a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def check_writable_dir(option: str, path: str | Path) -> None:
    """A directory that can be created and written: its nearest existing ancestor is a writable directory."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{option}={str(path)!r}: {existing} is a file, not a directory; allowed: a directory "
                          "path (existing or creatable)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={str(path)!r}: {existing} is not writable; allowed: a directory you can write")


class DiskFullError(MhcError):
    """The disk filled up during work (a checkpoint): one line saying where, how much was needed and is free."""

    exit_code = EXIT_FAILED
