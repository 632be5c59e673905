"""The residual package's one door to the optional Triton kernels of `mhc_lm.kernels` (docs/sinkhorn.md).

`residual.kernel` (auto | triton | torch) picks the kernels or the PyTorch path; `use_triton` is the
rule. The kernels are not part of an exported model's code bundle (mhc_lm/export.py turns the guarded
import below into `raise ImportError`): there every mixer takes the PyTorch path, and the option is
only checked against its allowed values.
"""

from __future__ import annotations

import torch

try:
    from mhc_lm.kernels import (KERNEL_CHOICES, check_kernel_choice, check_kernel_usable, glue_ops, sinkhorn_ops,
                                use_triton)
except ImportError:
    KERNEL_CHOICES = ("auto", "triton", "torch")

    def check_kernel_choice(value, n: int = 1) -> None:
        if value not in KERNEL_CHOICES:
            raise ValueError(f"residual.kernel={value!r}: unknown kernel choice; allowed: {', '.join(KERNEL_CHOICES)}")

    check_kernel_usable = check_kernel_choice

    def use_triton(kernel: str, tensor: torch.Tensor, n: int) -> bool:
        return False

    def glue_ops():  # never reached: use_triton is False
        raise ImportError("the Triton kernels (mhc_lm.kernels) are not available here")

    sinkhorn_ops = glue_ops

__all__ = ["KERNEL_CHOICES", "check_kernel_choice", "check_kernel_usable", "glue_ops", "sinkhorn_ops", "use_triton"]
