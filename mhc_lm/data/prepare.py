"""One entry point per job, whatever the source (`mhc_lm.data.sources` does the source-specific part):
`prepare_data` (tokenizer, validation tokens, the training data) and `make_train_loader` (the stateful
loader of this rank)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import ConfigError
from .blocks import BlockLoader
from .config import DataConfig
from .sources import SOURCES, DocumentSource, TokenData, source_of
from .streaming import StreamLoader


def prepare_data(cfg: DataConfig) -> TokenData:
    """The tokenizer, the validation tokens and the training data of `cfg`."""
    data = source_of(cfg.source).prepare(cfg)
    splits = [("validation", data.validation)] + ([("train", data.train)] if data.train is not None else [])
    for split, tokens in splits:
        if len(tokens) < cfg.seq_len + 1:
            raise ConfigError(f"data.seq_len={cfg.seq_len}: the {split} split has only {len(tokens)} tokens, "
                              f"fewer than one block; allowed: < {len(tokens)}")
    return data


def make_train_loader(data: TokenData, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """This rank's stateful training loader: `next_batch()`, `state_dict()`, `load_state_dict()`."""
    cfg = data.cfg
    if data.stream is not None:
        return StreamLoader(data.stream, data.tokenizer, cfg.seq_len, batch_size, seed, rank, world_size,
                            shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, prefetch=cfg.prefetch)
    return BlockLoader(data.train, cfg.seq_len, batch_size, seed, rank, world_size, shuffle=cfg.shuffle)


def load_data_tokenizer(cfg: DataConfig):
    """The tokenizer a run of `cfg` trains with (ours is read from its cache when it is there)."""
    return source_of(cfg.source).tokenizer(cfg)


def load_documents(cfg: DataConfig):
    """(DatasetDict with train/validation `text` columns, fingerprint of the split) of a document source."""
    source = source_of(cfg.source)
    if not isinstance(source, DocumentSource):
        raise ConfigError(f"data.source={cfg.source!r}: has no documents in memory; allowed: "
                          f"{', '.join(n for n, s in SOURCES.items() if isinstance(s, DocumentSource))}")
    return source.load_documents(cfg)


def documents_for_prepare(cfg: DataConfig) -> tuple[object, dict[str, Iterable[str]]]:
    """(tokenizer, {"train": texts, "validation": texts}) of a source, in its natural order, for `prepare`."""
    return source_of(cfg.source).documents(cfg)


def unigram_loss(train, validation, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on validation of an add-one unigram model fitted on train: the floor
    any language model of this tokenizer must beat."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(validation, dtype=np.int64)].mean())
