"""Pre-tokenized token shards: written once by `python -m mhc_lm.data prepare`, memory-mapped for training.

A shard directory holds:
  - `train-00000.bin`, ... and `validation-00000.bin`, ...: raw little-endian token ids (uint16 when the
    vocabulary fits, else uint32), documents each followed by the end-of-text token, concatenated; a
    shard boundary may fall anywhere, the shards of a split are read as one stream;
  - `tokenizer/`: the tokenizer (`save_pretrained`), loaded with AutoTokenizer;
  - `manifest.json`: format and version, dtype, end-of-text id, vocabulary size, per split the shard files
    with their token counts and the document count, the data configuration it was prepared from, and
    the tokens/s of the preparation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ConfigError
from .cache import atomic_dir_write
from .tokenizer import encode_texts, token_dtype

MANIFEST = "manifest.json"
FORMAT = "mhc-lm-token-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "validation")


class ShardedTokens:
    """The shards of one split read as one token stream: `len()` and contiguous slices across shard ends."""

    def __init__(self, paths: list[Path], counts: list[int], dtype):
        kept = [(p, n) for p, n in zip(paths, counts) if n > 0]  # np.memmap cannot map an empty file
        self.shards = [np.memmap(p, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", shape=(n,)) for p, n in kept]
        self.starts = np.cumsum([0] + [n for _, n in kept])
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("ShardedTokens supports contiguous slices only")
        parts = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            local = start - int(self.starts[shard])
            take = min(stop - start, len(self.shards[shard]) - local)
            parts.append(self.shards[shard][local: local + take])
            start, shard = start + take, shard + 1
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_manifest(directory: str) -> dict:
    """The manifest of a shard directory, checked: every named shard exists with its token count."""
    root = Path(directory).expanduser()
    allowed = "allowed: a directory written by python -m mhc_lm.data prepare DATA_CONFIG --out DIR"
    if not root.is_dir():
        raise ConfigError(f"data.dir={directory!r}: no such directory; {allowed}")
    if not (root / MANIFEST).is_file():
        raise ConfigError(f"data.dir={directory!r}: has no {MANIFEST}; {allowed}")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"data.dir={directory!r}: {MANIFEST} is not valid JSON ({err}); {allowed}") from None
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > MANIFEST_VERSION:
        raise ConfigError(f"data.dir={directory!r}: {MANIFEST} is format {manifest.get('format')!r} version "
                          f"{manifest.get('version')!r}; allowed: {FORMAT} version <= {MANIFEST_VERSION}")
    if manifest.get("dtype") not in ("uint16", "uint32"):
        raise ConfigError(f"data.dir={directory!r}: dtype {manifest.get('dtype')!r}; allowed: uint16, uint32")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = root / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                raise ConfigError(f"data.dir={directory!r}: shard {shard['file']} is missing or not "
                                  f"{shard['tokens']} tokens long; allowed: a complete prepared directory")
    if not (root / manifest["tokenizer"]).is_dir():
        raise ConfigError(f"data.dir={directory!r}: the tokenizer directory {manifest['tokenizer']!r} is missing")
    return manifest


def open_split(directory: str, manifest: dict, split: str) -> ShardedTokens:
    shards = manifest["splits"][split]["shards"]
    root = Path(directory).expanduser()
    return ShardedTokens([root / s["file"] for s in shards], [s["tokens"] for s in shards], manifest["dtype"])


class ShardWriter:
    """Appends token arrays to `{split}-00000.bin`, ... of `shard_tokens` tokens each (the last one shorter)."""

    def __init__(self, directory: str, split: str, dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.dtype(self.dtype).newbyteorder("<"))
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            tokens[:room].tofile(self._file)
            self.shards[-1]["tokens"] += min(room, len(tokens))
            tokens = tokens[room:]

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(os.path.join(self.directory, name), "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict]:
        if self._file is not None:
            self._file.close()
        return self.shards


def _chunks(texts: Iterable[str], size: int):
    chunk = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_split(tmp: str, split: str, texts: Iterable[str], tokenizer, shard_tokens: int,
                 max_tokens: int | None, progress) -> dict:
    dtype = token_dtype(tokenizer)
    writer, documents, tokens = ShardWriter(tmp, split, dtype, shard_tokens), 0, 0
    progress.set_description(f"Tokenizing {split}")
    for chunk in _chunks(texts, 256):
        for ids in encode_texts(tokenizer, chunk):
            writer.write(np.asarray(ids, dtype=dtype))
            documents, tokens = documents + 1, tokens + len(ids)
            progress.update(len(ids))
            if max_tokens is not None and tokens >= max_tokens:
                break
        progress.set_postfix(docs=f"{documents:,}")
        if max_tokens is not None and tokens >= max_tokens:
            break
    return {"shards": writer.close(), "tokens": tokens, "documents": documents}


def write_shards(out: str, tokenizer, splits: dict[str, Iterable[str]], source: dict, shard_tokens: int,
                 max_tokens: int | None = None) -> dict:
    """Tokenize the documents of each split into shards under `out` (written atomically); return the manifest.

    `max_tokens` stops the train split at the first document boundary at or after that many tokens.
    """
    from tqdm.auto import tqdm

    manifest = {"format": FORMAT, "version": MANIFEST_VERSION, "dtype": token_dtype(tokenizer).name,
                "eot_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer), "tokenizer": "tokenizer",
                "splits": {}, "source": source}

    def write(tmp: str) -> None:
        started = time.perf_counter()
        with tqdm(unit="tok", unit_scale=True, total=max_tokens, desc="Tokenizing") as progress:
            for split in SPLITS:
                limit = max_tokens if split == "train" else None
                manifest["splits"][split] = _write_split(tmp, split, splits[split], tokenizer, shard_tokens, limit,
                                                         progress)
        seconds = time.perf_counter() - started
        total = sum(s["tokens"] for s in manifest["splits"].values())
        manifest["tokens_per_s"] = round(total / seconds) if seconds > 0 else None
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)

    atomic_dir_write(Path(out), write)
    if not (Path(out) / MANIFEST).is_file():
        raise ConfigError(f"--out={out!r}: could not be written (it appeared meanwhile and is not empty)")
    return manifest
