"""Start-up hook for a test's train.py subprocess (this folder on PYTHONPATH): records what W&B's own
`Run.log` receives, one JSON line per call to $MHC_WANDB_CAPTURE: {"step": N, "data": {key: value}}, media
objects as their wandb class name ("Image", "Histogram"). The run still goes to W&B (offline) unchanged;
this reads the API boundary instead of re-implementing W&B's file format, which W&B 0.31 has no reader for.
"""

import json
import os

from wandb.sdk.wandb_run import Run

_log = Run.log


def _value(value):
    return value if isinstance(value, (int, float, str, bool)) else type(value).__name__


def _recording_log(self, data, step=None, commit=None):
    with open(os.environ["MHC_WANDB_CAPTURE"], "a") as capture:
        capture.write(json.dumps({"step": step, "data": {k: _value(v) for k, v in data.items()}}) + "\n")
    return _log(self, data, step=step, commit=commit)


if os.environ.get("MHC_WANDB_CAPTURE"):
    Run.log = _recording_log
