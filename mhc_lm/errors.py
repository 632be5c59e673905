"""The errors mhc-lm raises on purpose: a leaf module that every layer may import."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad option value. The message reads `option=value: what is allowed`."""
