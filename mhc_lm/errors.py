"""The errors mhc-lm raises on purpose, and the exit code each one ends a run with: a leaf module that
every layer may import.

| exit code | meaning |
|---|---|
| 0 | done |
| 1 | a bug: Python's traceback |
| 2 | bad input found before any work (config value, file, checkpoint, path, launch environment) |
| 74 | a checkpoint could not be written (disk full): the previous checkpoint is intact |
| 75 | preempted (SIGTERM / SIGUSR1): a checkpoint was saved; requeue, or run RUN/continue.sh |

Each of them (but 0 and 1) is one line on stderr. 74 and 75 are sysexits.h's EX_IOERR and EX_TEMPFAIL.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_DISK_FULL = 74
EXIT_PREEMPTED = 75


class MhcError(Exception):
    """An expected failure: `cli` prints `prefix: message` as one line and exits with `exit_code`."""

    exit_code = 1
    prefix = "error"


class ConfigError(MhcError, ValueError):
    """A bad option value. The message reads `option=value: what is allowed`."""

    exit_code = EXIT_BAD_INPUT


class DiskFullError(MhcError, OSError):
    """A checkpoint did not fit on its disk. The message names the path, the bytes needed and free."""

    exit_code = EXIT_DISK_FULL


class Preempted(MhcError):
    """The run stopped on a signal after checkpointing; the message says how to continue."""

    exit_code = EXIT_PREEMPTED
    prefix = "preempted"
