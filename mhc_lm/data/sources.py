"""One entry point per job for every source: `prepare_data` (tokenizer, validation tokens, the training
data) and `make_train_loader` (the stateful loader of this rank).

| data.source | training data | loader |
|---|---|---|
| bundled, local | documents tokenized once, cached as .npy | BlockLoader |
| shards | memory-mapped shards written by `python -m mhc_lm.data prepare` | BlockLoader |
| hub | documents streamed, tokenized and packed on the fly | StreamLoader |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from ..config import ConfigError, DataConfig
from .blocks import BlockLoader
from .cache import atomic_dir_write, cache_root, digest
from .documents import load_documents
from .shards import open_split, read_manifest
from .streaming import StreamLoader, StreamSource, open_hub
from .tokenizer import encode_stream, encode_texts, get_tokenizer, load_tokenizer, token_dtype, tokenizer_fingerprint

UNIGRAM_SAMPLE_TOKENS = 1 << 26  # the unigram reference is fitted on at most this many training tokens


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
        if self.train is None:
            return f"train streamed from {self.cfg.path}"
        return f"train {len(self.train):,} tokens"


def tokenize_documents(docs, tokenizer, num_proc: int, desc: str) -> np.ndarray:
    """One token stream of a `datasets.Dataset` of documents (`encode_texts`, with progress bars)."""
    encoded = docs.map(lambda batch: {"input_ids": encode_texts(tokenizer, batch["text"])}, batched=True,
                       batch_size=64, remove_columns=docs.column_names, num_proc=num_proc if num_proc > 1 else None,
                       desc=desc)
    dtype = token_dtype(tokenizer)
    return np.concatenate([np.asarray(x, dtype=dtype) for x in encoded["input_ids"]]) if len(encoded) else \
        np.zeros(0, dtype=dtype)


def _open_hub(cfg: DataConfig):
    """(stream, validation texts, sample texts, tokenizer: ours trained on the sample, or cfg.tokenizer)."""
    source, val_texts, sample_texts = open_hub(cfg)
    return source, val_texts, sample_texts, get_tokenizer(cfg, lambda: sample_texts, digest("hub", *sample_texts))


def _open_documents(cfg: DataConfig):
    """(train/validation documents, split key, tokenizer: ours trained on the train split, or cfg.tokenizer)."""
    docs, split_key = load_documents(cfg)
    return docs, split_key, get_tokenizer(cfg, lambda: docs["train"]["text"], split_key)


def _prepare_documents(cfg: DataConfig) -> TokenData:
    """bundled, local: documents -> tokenizer -> cached train/validation token streams."""
    docs, split_key, tokenizer = _open_documents(cfg)
    path = cache_root(cfg) / "tokens" / digest(split_key, tokenizer_fingerprint(tokenizer))
    if not (path / "validation.npy").exists():

        def write(tmp: str) -> None:
            for split in ("train", "validation"):
                tokens = tokenize_documents(docs[split], tokenizer, cfg.num_proc, f"Tokenizing {split}")
                np.save(os.path.join(tmp, f"{split}.npy"), tokens)
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump({"tokenizer": tokenizer.name_or_path, "documents": {s: len(docs[s]) for s in docs}}, f)

        atomic_dir_write(path, write)
    train, validation = (np.load(path / f"{s}.npy", mmap_mode="r") for s in ("train", "validation"))
    return TokenData(cfg, tokenizer, train, validation, len(tokenizer))


def _prepare_shards(cfg: DataConfig) -> TokenData:
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


def _prepare_hub(cfg: DataConfig) -> TokenData:
    source, val_texts, sample_texts, tokenizer = _open_hub(cfg)
    dtype = token_dtype(tokenizer)
    validation = encode_stream(tokenizer, val_texts, dtype)
    sample = encode_stream(tokenizer, sample_texts, dtype)
    return TokenData(cfg, tokenizer, None, validation, len(tokenizer), stream=source, sample=sample)


def prepare_data(cfg: DataConfig) -> TokenData:
    """The tokenizer, the validation tokens and the training data of `cfg` (see the table above)."""
    prepare = {"bundled": _prepare_documents, "local": _prepare_documents, "shards": _prepare_shards,
               "hub": _prepare_hub}[cfg.source]
    data = prepare(cfg)
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
    if cfg.source == "shards":
        return _prepare_shards(cfg).tokenizer
    return (_open_hub(cfg) if cfg.source == "hub" else _open_documents(cfg))[-1]


def documents_for_prepare(cfg: DataConfig) -> tuple[object, dict[str, Iterable[str]]]:
    """(tokenizer, {"train": texts, "validation": texts}) of a source, in its natural order, for `prepare`."""
    if cfg.source == "hub":
        source, val_texts, _, tokenizer = _open_hub(cfg)
        train = source.texts(source.open(epoch=0, seed=0, shuffle=False, rank=0, world_size=1))
        return tokenizer, {"train": train, "validation": val_texts}
    if cfg.source == "shards":
        raise ConfigError(f"data.source={cfg.source!r}: is already prepared; allowed: bundled, local, hub")
    docs, _, tokenizer = _open_documents(cfg)
    return tokenizer, {split: iter(docs[split]["text"]) for split in ("train", "validation")}


def unigram_loss(train, validation, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on validation of an add-one unigram model fitted on train: the floor
    any language model of this tokenizer must beat."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(validation, dtype=np.int64)].mean())
