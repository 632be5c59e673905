"""data=local: text, JSON lines or Parquet files, tokenized once and cached."""

from __future__ import annotations

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

    def split(self, cfg: DataConfig):
        return local_split(cfg)

    def card_text(self, cfg: dict) -> str:
        return f"local files {cfg.get('files')} (validation: {cfg.get('val_files') or 'held-out documents'})"
