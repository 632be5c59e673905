"""The check of a run's `residual` section: the variant, its options, the collapse and the kernel choice.

Like the rest of this package (which ships inside every export), it raises ValueError with the message
`option=value: what is allowed`; mhc_lm.config turns it into a ConfigError.
"""

from __future__ import annotations

from typing import Any

from .collapse import COLLAPSE_MODES
from .dispatch import check_kernel_usable
from .registry import MIXERS, make_mixer, mixer_options


def _check_choice(option: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r}: allowed: {', '.join(map(str, choices))}")


def validate_residual(residual: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad key of `residual` (the variant's own checks included)."""
    name = residual.get("name")
    _check_choice("residual.name", name, sorted(MIXERS))
    n = residual.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"residual.n={n!r}: the number of streams must be an integer >= 1")
    _check_choice("residual.collapse", residual.get("collapse", "head"), COLLAPSE_MODES)
    make_mixer(name, 1, n, 0, **mixer_options(residual))  # the variant's own checks, on a mixer of width 1
    check_kernel_usable(residual.get("kernel", "auto"), n)  # a forced triton needs triton and a GPU (or the interpreter)
