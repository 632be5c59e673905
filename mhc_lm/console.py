"""What the console shows: our progress bars and results, not the libraries' chatter.

`quiet_libraries()` runs once at the start of train.py and eval.py; `quiet_lm_eval()` wraps a call
into lm-evaluation-harness. Real warnings and errors still show: only the lines each library prints
on every ordinary run are silenced, each for the reason given next to it.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

# lm-eval's warnings about the way we hand it a model: we pass an already-built model on purpose, once per
# model evaluated, and each of these would be printed for every model.
LM_EVAL_EXPECTED = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
)


def quiet_libraries() -> None:
    # accelerate logs every checkpoint file at INFO; with tied embeddings it notes that lm_head.weight is not
    # saved twice.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    # matplotlib announces at INFO that it built its font cache, the first time a user plots.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # DeepSpeed, imported by accelerate and transformers when installed, warns on every CPU-only run that it
    # fell back to the CPU (in the middle of the progress bar). Naming the CPU is the same choice, silently.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(expected in message for expected in LM_EVAL_EXPECTED)


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval at WARNING (its INFO lines narrate every task and seed), without the expected warnings above."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", *logging.root.manager.loggerDict)
               if name == "lm_eval" or name.startswith("lm_eval.")]
    drop = _DropExpected()
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
            logger.removeFilter(drop)
