"""The tokenizer (our cached byte-level BPE, or any Hugging Face tokenizer) and the one way we encode text.

Every source encodes documents with `encode_texts`: the tokenizer's ids without special tokens, then
the end-of-text token. The same documents therefore give the same tokens whether they are cached as
.npy, written to shards by `prepare`, or streamed.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Iterable

import numpy as np

from ..errors import ConfigError, fail
from .config import DataConfig
from .cache import atomic_dir_write, cache_root, digest

EOT = "<|endoftext|>"


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
        show_progress=sys.stdout.isatty(),  # its bar draws on a terminal; elsewhere it prints only blank lines
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, pad_token=EOT)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
TOKENIZER_ALLOWED = ("allowed: bpe (trained on the data), a Hugging Face tokenizer name such as gpt2 or ORG/NAME, "
                     "or a directory written by save_pretrained")


def check_tokenizer(name: str, option: str = "data.tokenizer") -> None:
    """Before any work: `bpe`, a directory holding tokenizer files, or what could be a Hub name."""
    if name == "bpe":
        return
    path = os.path.expanduser(name)
    if name.startswith(("/", ".", "~")) or os.path.exists(path):
        if not os.path.isdir(path):
            fail(option, name, f"no such directory; {TOKENIZER_ALLOWED}")
        if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
            fail(option, name, f"the directory has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); "
                               f"{TOKENIZER_ALLOWED}")
    elif not HUB_NAME.match(name):
        fail(option, name, f"neither a directory nor a Hub name; {TOKENIZER_ALLOWED}")


def load_tokenizer(name_or_path: str, option: str = "data.tokenizer"):
    """A Hugging Face tokenizer by name or path; it must have an end-of-text token to put between documents."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # not on the Hub, no network, not a tokenizer
        first = " ".join(str(err).split("\n")[0].split())[:200]
        raise ConfigError(f"{option}={name_or_path!r}: cannot be loaded ({first}); {TOKENIZER_ALLOWED}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{option}={name_or_path!r}: has no end-of-text (eos) token to put between documents; "
                          "allowed: a tokenizer with an eos_token")
    return tokenizer


def get_tokenizer(cfg: DataConfig, train_texts: Callable[[], list[str]], key: str):
    """Our BPE (tokenizer=bpe) trained on `train_texts()` and cached under `key`, or a HF tokenizer."""
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)
    path = cache_root(cfg) / "tokenizers" / digest(key, str(cfg.vocab_size))
    if not (path / "tokenizer.json").exists():
        tokenizer = train_bpe(train_texts(), cfg.vocab_size)
        atomic_dir_write(path, tokenizer.save_pretrained)
    return load_tokenizer(str(path))


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return digest(backend.to_str() if backend is not None else tokenizer.name_or_path)


def token_dtype(tokenizer) -> np.dtype:
    """The smallest unsigned integer type that holds every id of the tokenizer."""
    return np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32)


def encode_texts(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Each document's ids (no special tokens), followed by the end-of-text token."""
    texts = list(texts)
    if not texts:
        return []
    eot = tokenizer.eos_token_id
    return [ids + [eot] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_stream(tokenizer, texts: Iterable[str], dtype=np.uint32) -> np.ndarray:
    """`encode_texts`, concatenated into one token stream."""
    ids = encode_texts(tokenizer, texts)
    return np.concatenate([np.asarray(x, dtype=dtype) for x in ids]) if ids else np.zeros(0, dtype=dtype)
