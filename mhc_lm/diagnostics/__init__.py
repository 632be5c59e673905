"""Diagnostics of the residual mixing: gains, spectra, constraint health, streams, gradients.

What each number means: docs/diagnostics.md. The package has four rooms:

* `stats.py`: the math on per-token H_res matrices and streams (gains, spectra, composites, entropy).
* `probe.py`: the probe (`run_diagnostics`), one forward pass with a hook on every `Mixer`; it asks the
  mixer interface for the coefficients, gate scales and Sinkhorn logits, and never names a variant.
  The report, its W&B scalars and files, and `log_diagnostics` for the training loop.
* `grad_norms.py`: `GradNorms`, global, per block and per parameter group, every optimizer step.
* `cli.py`: `python -m mhc_lm.diagnostics PATH`, the report of a checkpoint, run, export or Hub id.

Reductions over tokens: every per-token quantity is reported as its mean over the probe's tokens
(`*_mean`) and its maximum (`*_max`, or `*_min` where the small end matters). The plots draw the token
mean as solid lines and the token max as dashed lines, and say so.
"""

from .cli import diagnose_source, main, print_summary
from .grad_norms import GradNorms, parameter_groups
from .probe import (DiagnosticsReport, SublayerProbe, log_diagnostics, measure_mixer, probe_batch, probe_mixers,
                    report_scalars, run_diagnostics, sublayer_name)
from .stats import (LOGIT_RANGE_LIMIT, amax_gains, composite_stats, composites, effective_rank, h_res_stats,
                    logit_stats, row_entropy, stream_stats)

__all__ = [
    "LOGIT_RANGE_LIMIT", "DiagnosticsReport", "GradNorms", "SublayerProbe", "amax_gains", "composite_stats",
    "composites", "diagnose_source", "effective_rank", "h_res_stats", "log_diagnostics", "logit_stats", "main",
    "measure_mixer", "parameter_groups", "print_summary", "probe_batch", "probe_mixers", "report_scalars",
    "row_entropy", "run_diagnostics", "stream_stats", "sublayer_name",
]
