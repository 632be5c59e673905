"""data=hub: a Hugging Face dataset (or a local one, or files through a packaged loader) streamed,
tokenized and packed on the fly."""

from __future__ import annotations

import os

from ...errors import check_min, fail
from ..cache import digest
from ..config import DataConfig, expand_files
from ..streaming import open_hub
from ..tokenizer import encode_stream, get_tokenizer, token_dtype
from .base import DataSource, TokenData, register

LOADERS_NEEDING_FILES = ("json", "parquet", "text", "csv", "arrow")  # datasets' packaged loaders


@register
class HubSource(DataSource):
    name = "hub"
    streamed = True

    def validate(self, cfg: DataConfig) -> None:
        if not cfg.path:
            fail("data.path", cfg.path, "data=hub needs a dataset; allowed: a Hub name (HuggingFaceFW/fineweb-edu), "
                                        "a local directory, or a loader (json, parquet, text) with data.data_files")
        if cfg.path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(cfg.path)):
            fail("data.path", cfg.path, "no such directory; allowed: a Hub dataset name, an existing local directory, "
                                        f"or a loader ({', '.join(LOADERS_NEEDING_FILES)}) with data.data_files")
        if cfg.path in LOADERS_NEEDING_FILES and not cfg.data_files:
            fail("data.data_files", list(cfg.data_files), f"data.path={cfg.path} reads the files named here; "
                                                          "allowed: files or glob patterns")
        for pattern in cfg.data_files:
            if "://" not in pattern and not expand_files([pattern]):
                fail("data.data_files", pattern, "no such file: allowed: existing files or glob patterns, or URLs")
        for key in ("val_docs", "sample_docs"):
            check_min(f"data.{key}", getattr(cfg, key), 1)
        check_min("data.shuffle_buffer", cfg.shuffle_buffer, 0)
        check_min("data.prefetch", cfg.prefetch, 0)

    def _open(self, cfg: DataConfig):
        """(stream, validation texts, sample texts, tokenizer: ours trained on the sample, or cfg.tokenizer)."""
        stream, val_texts, sample_texts = open_hub(cfg)
        return stream, val_texts, sample_texts, get_tokenizer(cfg, lambda: sample_texts, digest("hub", *sample_texts))

    def prepare(self, cfg: DataConfig) -> TokenData:
        stream, val_texts, sample_texts, tokenizer = self._open(cfg)
        dtype = token_dtype(tokenizer)
        validation = encode_stream(tokenizer, val_texts, dtype)
        sample = encode_stream(tokenizer, sample_texts, dtype)
        return TokenData(cfg, tokenizer, None, validation, len(tokenizer), stream=stream, sample=sample)

    def tokenizer(self, cfg: DataConfig):
        return self._open(cfg)[-1]

    def documents(self, cfg: DataConfig):
        stream, val_texts, _, tokenizer = self._open(cfg)
        train = stream.texts(stream.open(epoch=0, seed=0, shuffle=False, rank=0, world_size=1))
        return tokenizer, {"train": train, "validation": val_texts}

    def describe(self, data: TokenData) -> str:
        return f"train streamed from {data.cfg.path}"

    def card_text(self, cfg: dict) -> str:
        what = f"the dataset `{cfg.get('path')}`" + (f" ({cfg.get('name')})" if cfg.get("name") else "")
        split = f"split `{cfg.get('split')}`" + (f" at revision `{cfg.get('revision')}`" if cfg.get("revision") else "")
        validation = f"split `{cfg.get('val_split')}`" if cfg.get("val_split") else \
            f"its first {cfg.get('val_docs')} documents (or the dataset's validation split)"
        return f"{what}, {split}, streamed (validation: {validation})"
