"""data=local: text, JSON lines or Parquet files, tokenized once and cached."""

from __future__ import annotations

import os

from ...errors import check_choice, fail
from ..config import FILE_FORMATS, DataConfig, expand_files, file_format
from ..documents import local_split
from .base import register
from .documents import DocumentSource


@register
class LocalSource(DocumentSource):
    name = "local"

    def validate(self, cfg: DataConfig) -> None:
        if cfg.format is not None:
            check_choice("data.format", cfg.format, FILE_FORMATS)
        for option in ("files", "val_files"):
            patterns = list(getattr(cfg, option))
            if option == "files" and not patterns:
                fail("data.files", patterns, "data=local needs at least one file, directory or glob pattern")
            for pattern in patterns:
                if not expand_files([pattern]):
                    fail(f"data.{option}", pattern, "no such file: allowed: existing files, directories or glob patterns")
            for path in expand_files(patterns):
                fmt = cfg.format or file_format(path)
                if fmt not in FILE_FORMATS:
                    fail(f"data.{option}", path, f"unknown file type; allowed: .txt, .jsonl, .json, .parquet "
                                                 f"(or set data.format to one of {', '.join(FILE_FORMATS)})")
                if is_blank(path):
                    fail(f"data.{option}", path, "the file is empty (no document in it); allowed: files with text")
        check_split(cfg)

    def split(self, cfg: DataConfig):
        return local_split(cfg)

    def card_text(self, cfg: dict) -> str:
        return f"local files {cfg.get('files')} (validation: {cfg.get('val_files') or 'held-out documents'})"


BLANK_CHECK_BYTES = 1 << 16


def is_blank(path: str) -> bool:
    """Empty, or (for a small file) only whitespace: no document to read. Large files are not read here."""
    size = os.path.getsize(path)
    if size > BLANK_CHECK_BYTES:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def check_split(cfg: DataConfig) -> None:
    """Something is left to train on once the validation files are set apart."""
    val = set(expand_files(cfg.val_files))
    train = [p for p in expand_files(cfg.files) if p not in val]
    if not train:
        fail("data.files", list(cfg.files), "every file is also in data.val_files, none is left to train on; "
                                            "allowed: training files apart from the validation files")
