"""The check of a run's `residual` section: the variant, its options, the collapse and the kernel choice.

Like the rest of this package (which ships inside every export), it raises ValueError with the message
`option=value: what is allowed`; mhc_lm.config turns it into a ConfigError.
"""

from __future__ import annotations

from typing import Any

from .collapse import COLLAPSE_MODES
from .dispatch import check_kernel_usable
from .registry import MIXERS, make_mixer, mixer_options, parse_options


def _check_choice(option: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r}: allowed: {', '.join(map(str, choices))}")


# The range of every numeric residual option, by name (whichever variants have it): (low, low end open).
NUMERIC_RANGES: dict[str, tuple[float, bool]] = {
    "rms_eps": (0.0, True),  # inside rsqrt: must keep a zero vector finite
    "hc_eps": (0.0, False), "sinkhorn_eps": (0.0, False), "collapse_eps": (0.0, False),
    "scale_init": (0.0, False), "fn_init_std": (0.0, False),
    "pre_init_strength": (0.0, False), "res_init_strength": (0.0, False),
    "sinkhorn_iters": (1, False),
}


def check_numbers(residual: dict[str, Any]) -> None:
    """Every numeric option is a number (an integer where the variant counts) in its range."""
    for key, (low, low_open) in NUMERIC_RANGES.items():
        if key not in residual:
            continue
        value = residual[key]
        integer = isinstance(low, int)
        kinds = (int,) if integer else (int, float)
        allowed = f"an integer >= {low}" if integer else f"a number {'>' if low_open else '>='} {low}"
        if not isinstance(value, kinds) or isinstance(value, bool) or value < low or (low_open and value == low):
            raise ValueError(f"residual.{key}={value!r}: allowed: {allowed}")


def validate_residual(residual: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad key of `residual` (the variant's own checks included)."""
    name = residual.get("name")
    _check_choice("residual.name", name, sorted(MIXERS))
    n = residual.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"residual.n={n!r}: the number of streams must be an integer >= 1")
    _check_choice("residual.collapse", residual.get("collapse", "head"), COLLAPSE_MODES)
    parse_options(name, mixer_options(residual))  # unknown keys first: a typo is not a range error
    check_numbers(residual)
    make_mixer(name, 1, n, 0, **mixer_options(residual))  # the variant's own checks, on a mixer of width 1
    check_kernel_usable(residual.get("kernel", "auto"), n)  # a forced triton needs triton and a GPU (or the interpreter)
