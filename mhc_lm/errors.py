"""The errors mhc-lm raises on purpose, and the checks that raise them: a leaf module every layer may import."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad option value. The message reads `option=value: what is allowed`."""


def fail(option: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{option}={value!r}: {allowed}")


def check_choice(option: str, value: Any, choices) -> None:
    if value not in choices:
        fail(option, value, f"allowed: {', '.join(map(str, choices))}")


def check_min(option: str, value: Any, minimum: int | float) -> None:
    if value is None or value < minimum:
        fail(option, value, f"allowed: a number >= {minimum}")
