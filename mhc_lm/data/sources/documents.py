"""What the finite document sources (bundled, local) share: documents split into train and validation,
a tokenizer trained on the train split (or named), and both splits tokenized once into a cache."""

from __future__ import annotations

import json
import os

import numpy as np

from ..cache import atomic_dir_write, cache_root, digest
from ..config import DataConfig
from ..tokenizer import encode_texts, get_tokenizer, token_dtype, tokenizer_fingerprint
from .base import DataSource, TokenData


def tokenize_documents(docs, tokenizer, num_proc: int, desc: str) -> np.ndarray:
    """One token stream of a `datasets.Dataset` of documents (`encode_texts`, with progress bars)."""
    encoded = docs.map(lambda batch: {"input_ids": encode_texts(tokenizer, batch["text"])}, batched=True,
                       batch_size=64, remove_columns=docs.column_names, num_proc=num_proc if num_proc > 1 else None,
                       desc=desc)
    dtype = token_dtype(tokenizer)
    return np.concatenate([np.asarray(x, dtype=dtype) for x in encoded["input_ids"]]) if len(encoded) else \
        np.zeros(0, dtype=dtype)


class DocumentSource(DataSource):
    """A source of whole documents held in memory; subclasses say how they are read and split (`split`)."""

    def split(self, cfg: DataConfig):
        """(DatasetDict with train/validation `text` columns, fingerprint of the documents)."""
        raise NotImplementedError

    def load_documents(self, cfg: DataConfig):
        """(DatasetDict with train/validation `text` columns, fingerprint of the split)."""
        docs, fingerprint = self.split(cfg)
        return docs, digest(fingerprint, str(cfg.val_fraction), str(cfg.split_seed))

    def _open(self, cfg: DataConfig):
        """(train/validation documents, split key, tokenizer: ours trained on the train split, or cfg.tokenizer)."""
        docs, split_key = self.load_documents(cfg)
        return docs, split_key, get_tokenizer(cfg, lambda: docs["train"]["text"], split_key)

    def prepare(self, cfg: DataConfig) -> TokenData:
        """Documents -> tokenizer -> cached train/validation token streams."""
        docs, split_key, tokenizer = self._open(cfg)
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

    def tokenizer(self, cfg: DataConfig):
        return self._open(cfg)[-1]

    def documents(self, cfg: DataConfig):
        docs, _, tokenizer = self._open(cfg)
        return tokenizer, {split: iter(docs[split]["text"]) for split in ("train", "validation")}
