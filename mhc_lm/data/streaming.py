"""Streaming a Hugging Face dataset (data=hub): documents tokenized on the fly and packed, resumable exactly.

The dataset is opened with `datasets.load_dataset(data.path, data.name, split=..., streaming=True)`: a
name on the Hub (HuggingFaceFW/fineweb-edu), a local directory of .parquet/.jsonl/.txt files, or a
packaged loader with `data.data_files` (`data.path=json data.data_files=[corpus/*.jsonl]`).

- **Ranks**: every rank opens the same stream and keeps its part with `split_dataset_by_node`: whole
  shards (files) when their number is a multiple of the world size, otherwise one document in
  world_size of every shard (each rank then reads everything; we warn). The loader never goes
  through `accelerator.prepare`.
- **Validation**: the dataset's `validation` split (or `data.val_split`), first `data.val_docs`
  documents; without one, the first `data.val_docs` documents of the training split are reserved and
  every training document with the same text is skipped.
- **Tokenizer**: a Hugging Face tokenizer (`data.tokenizer=NAME_OR_PATH`), or our BPE trained on the
  first `data.sample_docs` training documents (cached). The same sample fits the unigram reference.
- **Epochs and shuffling**: epoch e reads the shards in the order of `shuffle(seed=seed + e)` with a
  one-document buffer (datasets' example buffer is not saved in its state_dict, so we keep it empty),
  packs documents into blocks, and mixes the blocks in our own buffer of `data.shuffle_buffer` blocks,
  which is part of the saved state. When a rank's shards run out, its buffer is drained, so an epoch
  emits every one of its blocks once; the unfinished block carries into the next epoch.
- **Resume**: the state (see `state.py`) holds the dataset's own `state_dict()` after the last document
  read, the tokens not yet in a block and the buffered blocks: the next batches are exactly those an
  uninterrupted run would have seen. It needs datasets >= 5.0.1 (earlier versions stop tracking the
  position after a first resume).
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..errors import ConfigError
from .config import DataConfig
from .cache import digest
from .state import STATE_VERSION, check_state, decode_array, encode_array
from .tokenizer import encode_stream, tokenizer_fingerprint

DOCS_PER_READ = 16  # documents tokenized together; the carried tokens hold at most about this many


class _EmptyShuffleBufferNote(logging.Filter):
    """datasets warns that a resumed shuffle buffer loses its content; ours holds one document and is
    always empty between documents, so nothing is lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "state dict of a shuffle buffer" not in record.getMessage()


_NOTE_FILTER = _EmptyShuffleBufferNote()


def _load(cfg: DataConfig, split: str | None = None):
    from datasets import load_dataset

    kwargs = {"streaming": True}
    if cfg.data_files:
        kwargs["data_files"] = list(cfg.data_files)
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return load_dataset(cfg.path, cfg.name, split=split, **kwargs)


def document_digest(text: str) -> str:
    return digest(text)


@dataclass
class StreamSource:
    """How to open the training documents of a streamed dataset, epoch by epoch, on one rank."""

    cfg: DataConfig
    exclude: frozenset = field(default_factory=frozenset)  # digests of documents reserved for validation

    @property
    def fingerprint(self) -> str:
        c = self.cfg
        return digest(str(c.path), str(c.name), c.split, str(c.val_split), ",".join(c.data_files), str(c.revision),
                      c.text_field, *sorted(self.exclude))

    def open(self, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int):
        from datasets.distributed import split_dataset_by_node

        logging.getLogger("datasets.iterable_dataset").addFilter(_NOTE_FILTER)
        ds = _load(self.cfg, self.cfg.split)
        if shuffle:  # the shard order only: a one-document buffer is empty at every saved state
            ds = ds.shuffle(seed=seed + epoch, buffer_size=1)
        if world_size > 1 and ds.num_shards % world_size and rank == 0 and epoch == 0:
            warnings.warn(f"data.path={self.cfg.path!r}: {ds.num_shards} shard(s) is not a multiple of the "
                          f"{world_size} processes, so every process reads all shards and keeps one document in "
                          f"{world_size}; a shard count divisible by the world size reads each file once",
                          stacklevel=2)
        return split_dataset_by_node(ds, rank=rank, world_size=world_size)

    def texts(self, examples) -> Iterator[str]:
        """The documents' texts, without those reserved for validation."""
        for example in examples:
            text = _text_of(example, self.cfg)
            if not self.exclude or document_digest(text) not in self.exclude:
                yield text


def _text_of(example: dict, cfg: DataConfig) -> str:
    if cfg.text_field not in example:
        raise ConfigError(f"data.text_field={cfg.text_field!r}: no such column in {cfg.path}; "
                          f"allowed: {', '.join(example)}")
    return example[cfg.text_field]


def _first_texts(ds, cfg: DataConfig, count: int) -> list[str]:
    texts = []
    for example in ds:
        if len(texts) == count:
            break
        texts.append(_text_of(example, cfg))
    return texts


def open_hub(cfg: DataConfig) -> tuple[StreamSource, list[str], list[str]]:
    """(training stream, validation documents, sample of training documents) of a streamed dataset."""
    splits = list(_load(cfg).keys())
    for option in ("split", "val_split"):
        value = getattr(cfg, option)
        if value is not None and value not in splits:
            raise ConfigError(f"data.{option}={value!r}: {cfg.path} has no such split; allowed: {', '.join(splits)}")
    val_split = cfg.val_split or ("validation" if "validation" in splits and cfg.split != "validation" else None)
    train = _load(cfg, cfg.split)
    if val_split is not None:
        validation = _first_texts(_load(cfg, val_split), cfg, cfg.val_docs)
        source = StreamSource(cfg)
        sample = _first_texts(train, cfg, cfg.sample_docs)
    else:  # reserve the first val_docs documents of the stream, and skip their texts when training
        head = _first_texts(train, cfg, cfg.val_docs + cfg.sample_docs)
        validation = head[:cfg.val_docs]
        source = StreamSource(cfg, frozenset(document_digest(t) for t in validation))
        sample = [t for t in head[cfg.val_docs:] if document_digest(t) not in source.exclude]
    if not validation or not sample:
        raise ConfigError(f"data.val_docs={cfg.val_docs}: {cfg.path} has too few documents for a validation set "
                          f"and training ({len(validation)} for validation, {len(sample)} after them); allowed: a "
                          "smaller data.val_docs, or a dataset with more documents or a validation split")
    return source, validation, sample


class _Packer:
    """Reads this rank's documents, packs them into blocks and draws them from the shuffle buffer.

    Its position (`position()`) is everything the future depends on; the arrays in it are never
    modified in place, so a snapshot is a shallow copy.
    """

    def __init__(self, source: StreamSource, tokenizer, seq_len: int, seed: int, rank: int, world_size: int,
                 shuffle: bool, shuffle_buffer: int):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.seed, self.rank, self.world_size, self.shuffle, self.shuffle_buffer = \
            seed, rank, world_size, shuffle, shuffle_buffer
        self.restore({"epoch": 0, "emitted": 0, "docs": 0, "hf_state": None,
                      "carry": np.zeros(0, dtype=np.uint32), "pool": []})

    def position(self) -> dict:
        return {"epoch": self.epoch, "emitted": self.emitted, "docs": self.docs, "hf_state": self.hf_state,
                "carry": self.carry, "pool": list(self.pool)}

    def restore(self, position: dict) -> None:
        self.epoch, self.emitted, self.docs = position["epoch"], position["emitted"], position["docs"]
        self.hf_state = position["hf_state"]  # the dataset's state after the last document read; None: epoch start
        self.carry = position["carry"]  # tokens read, not yet in a block
        self.pool = list(position["pool"])  # packed (seq_len + 1,) blocks waiting to be emitted
        self._dataset = self._examples = None
        self._exhausted = False

    def _open(self) -> None:
        self._dataset = self.source.open(self.epoch, self.seed, self.shuffle, self.rank, self.world_size)
        if self.hf_state is not None:
            self._dataset.load_state_dict(self.hf_state)
        self._examples = iter(self._dataset)
        self._exhausted = False

    def _read(self) -> None:
        """Read up to DOCS_PER_READ documents into the carried tokens; mark the epoch's end."""
        texts = []
        while len(texts) < DOCS_PER_READ:
            try:
                example = next(self._examples)
            except StopIteration:
                self._exhausted = True
                break
            texts.extend(self.source.texts([example]))
        self.hf_state = self._dataset.state_dict()
        self.docs += len(texts)
        if texts:
            self.carry = np.concatenate([self.carry, encode_stream(self.tokenizer, texts)])

    def _fill_pool(self, target: int) -> None:
        """Cut blocks from the carried tokens (reading more as needed) until the pool holds `target`."""
        block = self.seq_len + 1
        while len(self.pool) < target:
            if len(self.carry) >= block:
                self.pool.append(self.carry[:block].copy())
                self.carry = self.carry[self.seq_len:]
            elif self._exhausted:
                return
            else:
                self._read()

    def next_block(self) -> np.ndarray:
        while True:
            if self._examples is None:
                self._open()
            self._fill_pool(max(self.shuffle_buffer, 1))
            if self.pool:
                if self.shuffle_buffer:  # a random buffered block, drawn from (seed, rank, epoch, count)
                    rng = np.random.default_rng((self.seed, self.rank, self.epoch, self.emitted))
                    j = int(rng.integers(len(self.pool)))
                    self.pool[j], self.pool[-1] = self.pool[-1], self.pool[j]
                self.emitted += 1
                return self.pool.pop() if self.shuffle_buffer else self.pool.pop(0)
            if self.docs == 0:
                raise ConfigError(f"data.path={self.source.cfg.path!r}: process {self.rank} of {self.world_size} "
                                  "got no documents in a whole epoch; allowed: a dataset with at least as many "
                                  "documents (better: shards) as processes")
            self.epoch, self.emitted, self.docs, self.hf_state = self.epoch + 1, 0, 0, None
            self._examples = None


class StreamLoader:
    """Micro-batches of blocks packed on the fly from this rank's part of a streamed dataset.

    Same contract as BlockLoader: `next_batch()` returns (batch_size, seq_len + 1) int64 blocks that
    overlap by one token, an end-of-text token after every document; `state_dict()` /
    `load_state_dict()` resume exactly (same world size only). With `prefetch` > 0 a background thread
    prepares that many batches ahead (tokenizing overlaps the training step); every batch carries the
    position after it, and `state_dict()` is the position after the last batch served, so prefetching
    changes nothing in what is served or saved.
    """

    def __init__(self, source: StreamSource, tokenizer, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, shuffle_buffer: int = 256, prefetch: int = 0):
        self.source, self.tokenizer, self.seq_len, self.batch_size = source, tokenizer, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.prefetch = seed, rank, world_size, prefetch
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer if shuffle else 0
        self.fingerprint = digest(source.fingerprint, tokenizer_fingerprint(tokenizer))
        self._packer = _Packer(source, tokenizer, seq_len, seed, rank, world_size, self.shuffle, self.shuffle_buffer)
        self._served = self._packer.position()  # the position after the last batch served
        self._queue = None

    @property
    def epoch(self) -> int:
        """The epoch of this rank the last batch served belongs to (its last block)."""
        return self._served["epoch"]

    def _produce(self) -> tuple[torch.Tensor, dict]:
        rows = [self._packer.next_block() for _ in range(self.batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64)), self._packer.position()

    def _start_prefetch(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)

        def work() -> None:
            try:
                while True:
                    self._queue.put(self._produce())
            except BaseException as err:  # surfaces in next_batch, in the training loop
                self._queue.put(err)

        threading.Thread(target=work, daemon=True, name=f"stream-loader-rank{self.rank}").start()

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) int64 micro-batch of this rank."""
        if not self.prefetch:
            batch, self._served = self._produce()
            return batch
        if self._queue is None:
            self._start_prefetch()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._served = item
        return batch

    def state_dict(self) -> dict:
        import datasets

        served = self._served
        pool = np.stack(served["pool"]) if served["pool"] else np.zeros((0, self.seq_len + 1), dtype=np.uint32)
        return {"version": STATE_VERSION, "kind": "stream", "source": self.fingerprint, "seed": self.seed,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "seq_len": self.seq_len,
                "rank": self.rank, "world_size": self.world_size, "epoch": served["epoch"],
                "emitted": served["emitted"], "docs": served["docs"], "hf_state": served["hf_state"],
                "datasets_version": datasets.__version__, "carry": encode_array(served["carry"]),
                "pool": encode_array(pool)}

    def load_state_dict(self, state: dict) -> None:
        import datasets

        if self._queue is not None:
            raise RuntimeError("load_state_dict must come before the first next_batch of a prefetching loader")
        if state.get("kind") == "stream" and state.get("world_size") != self.world_size:
            raise ConfigError(f"trainer.resume: the streaming data state was saved by {state.get('world_size')} "
                              f"process(es), this run has {self.world_size}; allowed: resume with "
                              f"{state.get('world_size')} process(es)")
        check_state(state, "stream", {"source": self.fingerprint, "seed": self.seed, "shuffle": self.shuffle,
                                      "shuffle_buffer": self.shuffle_buffer, "seq_len": self.seq_len,
                                      "rank": self.rank})
        if state["datasets_version"] != datasets.__version__:
            warnings.warn(f"the data state was saved with datasets {state['datasets_version']}, this is "
                          f"{datasets.__version__}: the stream position is only exact if its format is unchanged")
        self._packer.restore({"epoch": state["epoch"], "emitted": state["emitted"], "docs": state["docs"],
                              "hf_state": state["hf_state"], "carry": decode_array(state["carry"]).astype(np.uint32),
                              "pool": list(decode_array(state["pool"]).astype(np.uint32))})
        self._served = self._packer.position()
