"""Where tokenizers and token streams are cached, and how a directory is written atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .config import DataConfig


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MHC_LM_CACHE") or os.path.join(Path.home(), ".cache", "mhc_lm")
    return Path(root).expanduser()


def digest(*parts: str) -> str:
    """A short stable hash of strings (cache keys, document identities)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def atomic_dir_write(path: Path, write) -> None:
    """Fill a temporary sibling directory with `write(tmp)`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first (or `path` is a non-empty directory): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
