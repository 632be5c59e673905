"""Fused Triton kernels for the mHC hot path (docs/sinkhorn.md), and the rule that picks them.

What is fused (each forward and backward, fp32 in registers whatever the input dtype):

* `sinkhorn.sinkhorn`: the Sinkhorn projection; the backward recomputes the exact gradient of the
  unrolled iteration on chip from the saved logits.
* `sinkhorn.mhc_coefficients`: the coefficient epilogue of the mHC generator (scales, biases, the
  sigmoids of pre and post, the Sinkhorn of res) from the matmul output and the per-token RMS.
* `glue.read_streams` and `glue.write_streams`: the read `H_pre · x` and the fused
  post + residual write `H_post^T ⊗ out + comb^T x`, generic in comb (any mixer).

Triton is optional (`pip install -e ".[kernels]"`): nothing here imports it until a kernel runs.
The choice is the common residual option `residual.kernel`:

* `auto` (default): the kernels for CUDA tensors when triton is installed, PyTorch otherwise;
* `triton`: always the kernels (on CPU only under the interpreter, `TRITON_INTERPRET=1`);
* `torch`: always the PyTorch path (the reference; it also runs under `torch.compile`).

At their first use on a GPU the kernels check themselves against a reference on a tiny input
(`selfcheck`); a failure stops the run with one line naming the GPU, triton and `residual.kernel=torch`.
"""

from __future__ import annotations

import importlib.util

import torch

from mhc_lm.errors import ConfigError

from .interpreter import interpreting

KERNEL_CHOICES = ("auto", "triton", "torch")
MAX_KERNEL_STREAMS = 8  # n x n matrices up to 8 x 8 fit a program's registers; `auto` keeps larger n on PyTorch

# Looked up once, without importing triton (a constant for torch.compile to trace through).
_TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether triton is installed."""
    return _TRITON_AVAILABLE


def _error(value, why: str, allowed=KERNEL_CHOICES):
    return ConfigError(f"residual.kernel={value!r}: {why}; allowed: {', '.join(allowed)}")


def check_kernel_choice(value, n: int = 1) -> None:
    """The option's value is one of KERNEL_CHOICES, and a forced `triton` fits n streams (device-independent)."""
    if value not in KERNEL_CHOICES:
        raise _error(value, "unknown kernel choice")
    if value == "triton" and n > MAX_KERNEL_STREAMS:
        raise _error(value, f"the kernels take up to {MAX_KERNEL_STREAMS} streams, not residual.n={n}",
                     allowed=("auto", "torch"))


def check_kernel_usable(value, n: int = 1, cuda: bool | None = None) -> None:
    """A forced `triton` can run here: triton is installed, and there is a GPU or the interpreter is on."""
    check_kernel_choice(value, n)
    if value != "triton":
        return
    if not triton_available():
        raise _error(value, "triton is not installed (pip install -e '.[kernels]')", allowed=("auto", "torch"))
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda and not interpreting():
        raise _error(value, "no CUDA device, and the Triton interpreter is off (TRITON_INTERPRET=1 runs the "
                            "kernels on CPU, slowly)", allowed=("auto", "torch"))


def use_triton(kernel: str, tensor: torch.Tensor, n: int) -> bool:
    """The one dispatch rule: True when `tensor` (of n streams) should go through the Triton kernels.

    The first time a process sends a CUDA tensor through them, the kernels check themselves on a tiny
    input (`selfcheck.check_once`): a GPU they fail on stops the run here with one line."""
    if kernel == "torch":
        return False
    if kernel == "auto":
        chosen = tensor.is_cuda and n <= MAX_KERNEL_STREAMS and triton_available()
    else:
        check_kernel_usable(kernel, n, cuda=tensor.is_cuda)
        chosen = True
    if chosen and tensor.is_cuda and not torch.compiler.is_compiling():  # traced code: checked before tracing
        from .selfcheck import check_once

        check_once(tensor.device)
    return chosen


def check_before_training(kernel: str, n: int, device: torch.device) -> None:
    """Run the self-check now if a model of n streams with `residual.kernel=kernel` will use the kernels on
    `device` (train.py, before its first step: a compiled forward skips the check while it is traced)."""
    if n > 1:
        use_triton(kernel, torch.empty(0, device=device), n)


# The two imports below are deferred on purpose: triton is an optional, heavy dependency.


def glue_ops():
    """(read_streams, write_streams), the apply kernels; the first call imports triton and defines them."""
    from .glue import read_streams, write_streams

    return read_streams, write_streams


def sinkhorn_ops():
    """(sinkhorn, mhc_coefficients), the Sinkhorn and mHC epilogue kernels; the first call imports triton."""
    from .sinkhorn import mhc_coefficients, sinkhorn

    return sinkhorn, mhc_coefficients
