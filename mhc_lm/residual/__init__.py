"""Residual mixers: one small module per variant behind `make_mixer` (docs/residual.md).

Importing this package registers every variant.
"""

from . import hc, ihc, kromhc, mhc, mhc_lite, orthogonal, orthostochastic, residual, shc, tbp  # noqa: F401  (registration side effects)
from .base import Mixer, apply_comb, read_streams, write_streams
from .collapse import COLLAPSE_MODES, HyperHead, expand_streams, make_collapse
from .registry import COMMON_OPTIONS, MIXERS, MODEL_KEYS, make_mixer, mixer_options, parse_options
from .sinkhorn import sinkhorn, sinkhorn_reference
from .validation import validate_residual

__all__ = [
    "COLLAPSE_MODES",
    "COMMON_OPTIONS",
    "MIXERS",
    "MODEL_KEYS",
    "HyperHead",
    "Mixer",
    "apply_comb",
    "read_streams",
    "expand_streams",
    "make_collapse",
    "make_mixer",
    "mixer_options",
    "parse_options",
    "sinkhorn",
    "sinkhorn_reference",
    "validate_residual",
    "write_streams",
]
