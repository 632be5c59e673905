"""Name -> data source, and what every source gives a run. A source registers itself with `@register`.

A data source (`data.source`) owns everything that depends on its kind: the checks of its options, the
preparation of the tokenizer, validation tokens and training data, the documents `python -m mhc_lm.data
prepare` shards, the one-line description printed at the start of a run and the sentence of the model card.
Nothing outside `mhc_lm/data/sources/` switches on a source's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from ...errors import ConfigError
from ..config import DataConfig
from ..streaming import StreamSource

UNIGRAM_SAMPLE_TOKENS = 1 << 26  # the unigram reference is fitted on at most this many training tokens

SOURCES: dict[str, "DataSource"] = {}


def register(cls: type) -> type:
    """Class decorator: one instance of each source, under its `name`."""
    SOURCES[cls.name] = cls()
    return cls


def source_of(name: str, option: str = "data.source") -> "DataSource":
    """The source called `name`; ConfigError naming the registered ones otherwise."""
    if name not in SOURCES:
        raise ConfigError(f"{option}={name!r}: allowed: {', '.join(SOURCES)}")
    return SOURCES[name]


@dataclass
class TokenData:
    """What a run needs from its data, whatever the source."""

    cfg: DataConfig
    tokenizer: object
    train: Optional[object]  # finite sources: the packed train token stream (array or ShardedTokens); hub: None
    validation: np.ndarray  # the validation token stream (its first blocks are the validation set)
    vocab_size: int  # len(tokenizer)
    stream: Optional[StreamSource] = None  # hub: this run's training stream
    sample: Optional[np.ndarray] = None  # hub: tokens of the first data.sample_docs training documents

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def unigram_sample(self) -> np.ndarray:
        """Training tokens the unigram reference is fitted on."""
        return self.sample if self.train is None else self.train[:UNIGRAM_SAMPLE_TOKENS]

    def describe(self) -> str:
        return SOURCES[self.cfg.source].describe(self)


class DataSource:
    """One kind of training data. Subclasses set `name` and implement the methods that raise here."""

    name: str = ""
    streamed: bool = False  # the training split is streamed: there is no fixed train set to evaluate

    def validate(self, cfg: DataConfig) -> None:
        """Check this source's own options (the common ones are checked by `validate_data`)."""

    def prepare(self, cfg: DataConfig) -> TokenData:
        """The tokenizer, the validation tokens and the training data."""
        raise NotImplementedError

    def tokenizer(self, cfg: DataConfig):
        """The tokenizer a run of `cfg` trains with (ours is read from its cache when it is there)."""
        raise NotImplementedError

    def documents(self, cfg: DataConfig) -> tuple[object, dict[str, Iterable[str]]]:
        """(tokenizer, {"train": texts, "validation": texts}) in their natural order, for `prepare`."""
        raise ConfigError(f"data.source={cfg.source!r}: is already prepared; allowed: "
                          f"{', '.join(n for n, s in SOURCES.items() if type(s).documents is not DataSource.documents)}")

    def describe(self, data: TokenData) -> str:
        """The training data in a few words, for the line printed at the start of a run."""
        return f"train {len(data.train):,} tokens"

    def card_text(self, cfg: dict) -> str:
        """What the model was trained on, for the model card; `cfg` is the run's saved `data` section."""
        raise NotImplementedError
