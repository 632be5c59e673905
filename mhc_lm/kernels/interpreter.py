"""Whether Triton runs its kernels in the CPU interpreter (a leaf: the kernel modules and the package ask it)."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Triton reads TRITON_INTERPRET=1 when a kernel is
    defined, so it must be set before `mhc_lm.kernels.sinkhorn` or `.glue` is imported (tests/conftest.py)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
