"""Name -> mixer class. A variant registers itself with `@register(name, OptionsDataclass)`."""

from __future__ import annotations

import dataclasses
from typing import Any

from .dispatch import check_kernel_choice

MIXERS: dict[str, tuple[type, type]] = {}

# Keys of the `residual` config that describe the model around the mixers, not one mixer.
MODEL_KEYS = ("name", "n", "collapse", "collapse_eps")

# Options every variant accepts, with their defaults; handled here, not in each options dataclass.
# kernel: auto | triton | torch, the Triton kernels or the PyTorch path (mhc_lm.kernels).
COMMON_OPTIONS: dict[str, Any] = {"kernel": "auto"}


def register(name: str, options_cls: type):
    def wrap(cls):
        MIXERS[name] = (cls, options_cls)
        cls.variant = name
        return cls

    return wrap


def parse_options(name: str, options: dict[str, Any]):
    """The options dataclass of variant `name`, built from `options` (the COMMON_OPTIONS aside); unknown keys
    are an error."""
    if name not in MIXERS:
        raise ValueError(f"residual.name={name!r}: unknown residual variant; allowed: {', '.join(sorted(MIXERS))}")
    options_cls = MIXERS[name][1]
    allowed = {f.name for f in dataclasses.fields(options_cls)} | set(COMMON_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"residual.{unknown[0]}={options[unknown[0]]!r}: not an option of residual={name}; "
            f"allowed: {', '.join(sorted(allowed | set(MODEL_KEYS)))}"
        )
    return options_cls(**{k: v for k, v in options.items() if k not in COMMON_OPTIONS})


def make_mixer(name: str, dim: int, n: int, layer_index: int, **options):
    """Build the mixer `name` for streams of width `dim` and count `n` at sublayer `layer_index`.

    Sublayers count attention and MLP separately in depth order (block b: 2b and 2b + 1). The module
    maps (streams (B, T, n, dim), branch) -> streams and exposes `coefficients(streams)`. Besides the
    variant's own options, every mixer takes the COMMON_OPTIONS (`kernel`).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"residual.n={n!r}: the number of streams must be an integer >= 1")
    opts = parse_options(name, options)
    kernel = options.get("kernel", COMMON_OPTIONS["kernel"])
    check_kernel_choice(kernel, n)
    mixer = MIXERS[name][0](dim, n, layer_index, opts)
    mixer.kernel, mixer.dim = kernel, dim
    return mixer


def mixer_options(residual: dict[str, Any]) -> dict[str, Any]:
    """The per-mixer options of a `residual` config (everything but the model-level keys)."""
    return {k: v for k, v in residual.items() if k not in MODEL_KEYS}
