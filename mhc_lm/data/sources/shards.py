"""data=shards: memory-mapped token shards written by `python -m mhc_lm.data prepare`."""

from __future__ import annotations

import os

from ...errors import ConfigError, fail
from ..config import DataConfig
from ..shards import open_split, read_manifest
from ..tokenizer import load_tokenizer
from .base import DataSource, TokenData, register


@register
class ShardsSource(DataSource):
    name = "shards"

    def validate(self, cfg: DataConfig) -> None:
        if not cfg.dir:
            fail("data.dir", cfg.dir, "data=shards needs the directory written by "
                                      "python -m mhc_lm.data prepare DATA_CONFIG --out DIR; allowed: that DIR")
        read_manifest(cfg.dir)

    def prepare(self, cfg: DataConfig) -> TokenData:
        """The shards' own tokenizer; a data.tokenizer other than the default must be that same tokenizer
        (eval.py names the model's), since the tokens are already written."""
        manifest = read_manifest(cfg.dir)
        tokenizer = load_tokenizer(os.path.join(os.path.expanduser(cfg.dir), manifest["tokenizer"]), "data.dir")
        if cfg.tokenizer != "bpe" and load_tokenizer(cfg.tokenizer).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"data.tokenizer={cfg.tokenizer!r}: data.dir={cfg.dir!r} was tokenized with another "
                              "tokenizer; allowed: bpe (the shards' own) or that same tokenizer, or prepare the data again")
        train = open_split(cfg.dir, manifest, "train")
        validation = open_split(cfg.dir, manifest, "validation")[:]
        return TokenData(cfg, tokenizer, train, validation, len(tokenizer))

    def tokenizer(self, cfg: DataConfig):
        return self.prepare(cfg).tokenizer

    def card_text(self, cfg: dict) -> str:
        return f"pre-tokenized shards in `{cfg.get('dir')}` (written by `python -m mhc_lm.data prepare`)"
