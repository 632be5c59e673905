"""The `data` section of a run's config (mirrored by conf/data/*.yaml), and how it names files.

A leaf of the data package: every data module, and mhc_lm.config, import the dataclass from here.
Each source checks its own options (`mhc_lm.data.sources`).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    source: str = "bundled"  # bundled | local | hub | shards
    corpus: str = "shakespeare"  # bundled corpus
    files: list[str] = field(default_factory=list)  # local: files, directories or glob patterns
    val_files: list[str] = field(default_factory=list)  # local: explicit validation files
    format: Optional[str] = None  # txt | jsonl | parquet; None: from the file extension
    text_field: str = "text"  # local (jsonl/parquet), hub: the column holding the text
    val_fraction: float = 0.05  # bundled, local: held-out documents when there are no val_files
    split_seed: int = 0
    path: Optional[str] = None  # hub: a dataset on the Hub, a local directory, or a loader (json, parquet, text)
    name: Optional[str] = None  # hub: the dataset's configuration (e.g. sample-10BT)
    split: str = "train"  # hub: the training split
    val_split: Optional[str] = None  # hub: None: `validation` if the dataset has it, else reserve val_docs
    val_docs: int = 256  # hub: validation documents (the first of val_split, or reserved from the stream)
    data_files: list[str] = field(default_factory=list)  # hub: passed to load_dataset (e.g. with path=json)
    revision: Optional[str] = None  # hub: a branch, tag or commit of the dataset
    sample_docs: int = 10000  # hub: first training documents, to train the BPE and fit the unigram reference
    dir: Optional[str] = None  # shards: a directory written by python -m mhc_lm.data prepare
    shuffle: bool = True  # shuffle blocks each epoch (hub: shard order and a block buffer)
    shuffle_buffer: int = 256  # hub: blocks in the shuffle buffer (saved with every checkpoint)
    prefetch: int = 4  # hub: batches prepared ahead by a background thread (0: in the training loop)
    tokenizer: str = "bpe"  # "bpe": train a byte-level BPE on the train split; else a HF name or path
    vocab_size: int = 4096  # for tokenizer=bpe
    seq_len: int = 256
    cache_dir: Optional[str] = None  # None: $MHC_LM_CACHE or ~/.cache/mhc_lm
    num_proc: int = 1


FILE_FORMATS = ("txt", "jsonl", "parquet")


def expand_files(patterns: list[str]) -> list[str]:
    """Files named by paths, directories (every file below) or glob patterns, sorted and deduplicated."""
    found: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found += [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p)]
        else:
            found += [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    return sorted(set(found))


def file_format(path: str) -> Optional[str]:
    ext = os.path.splitext(path)[1].lower()
    return {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl",
            ".parquet": "parquet"}.get(ext)
