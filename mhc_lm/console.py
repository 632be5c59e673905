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


# ---------------------------------------------------------------------------------------------
# The run's log file


class _Tee:
    """A console stream that also writes into the log file, without progress-bar redraws (writes that
    carry a carriage return, and the newline that closes a bar)."""

    def __init__(self, stream, log):
        self.stream, self.log, self.redrawing = stream, log, False

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        if "\r" in text or (self.redrawing and text == "\n"):
            self.redrawing = "\r" in text
        else:
            self.redrawing = False
            self.log.write(text)
            self.log.flush()
        return written

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno, ...: the console's
        return getattr(self.stream, name)


def job_log_file() -> str | None:
    """The log file Hydra's job logging writes (RUN/train.log, EVAL/eval.log); None where there is none
    (ranks other than 0 log to /dev/null)."""
    for handler in logging.getLogger().handlers:
        name = getattr(handler, "baseFilename", None)
        if isinstance(handler, logging.FileHandler) and name and name != os.devnull:
            return name
    return None


@contextlib.contextmanager
def console_to_log(path: str | None = None):
    """Copy what the console shows (stdout, stderr, progress bars' final lines excluded) into Hydra's job
    log file, next to the records Hydra's logging writes there: RUN/train.log then holds the run's log."""
    import sys

    path = path or job_log_file()
    if path is None:
        yield
        return
    with open(path, "a") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
