"""Text in, packed token blocks out, from any source, resumable exactly on every rank.

Sources (`data.source`, one module each in `sources/`, behind a registry like the residual mixers): the bundled corpus and local files (documents tokenized once and cached),
pre-tokenized shards (`shards.py`, written by `python -m mhc_lm.data prepare`), and any Hugging Face
dataset streamed, tokenized and packed on the fly (`streaming.py`). Whatever the source, documents are
encoded the same way (each followed by the end-of-text token) and cut into blocks of seq_len + 1 tokens
that overlap by one token, so every token is a target exactly once.

train.py needs two calls: `prepare_data(cfg)` (tokenizer, validation tokens, training data) and
`make_train_loader(data, ...)` (this rank's loader: `next_batch()`, `state_dict()`,
`load_state_dict()`); `eval_batches` cuts the validation blocks and `state_for_rank` picks the saved data
state a rank resumes from. The state format is documented in `state.py`.
"""

from .blocks import BlockLoader, eval_batches, gather_blocks, num_blocks
from .cache import cache_root
from .config import DataConfig
from .documents import bundled_documents, split_by_document
from .prepare import (documents_for_prepare, load_data_tokenizer, load_documents, make_train_loader, prepare_data,
                      unigram_loss)
from .shards import ShardedTokens, read_manifest, write_shards
from .sources import SOURCES, TokenData, source_of, tokenize_documents, validate_data
from .state import STATE_VERSION, state_for_rank
from .streaming import StreamLoader, StreamSource, open_hub
from .tokenizer import EOT, encode_texts, get_tokenizer, train_bpe

__all__ = [
    "BlockLoader", "DataConfig", "EOT", "SOURCES", "STATE_VERSION", "ShardedTokens", "StreamLoader", "StreamSource", "TokenData",
    "bundled_documents", "cache_root", "documents_for_prepare", "encode_texts", "eval_batches", "gather_blocks",
    "get_tokenizer", "load_data_tokenizer", "load_documents", "make_train_loader", "num_blocks", "open_hub", "prepare_data",
    "read_manifest", "source_of", "split_by_document", "state_for_rank", "tokenize_documents", "train_bpe", "unigram_loss",
    "validate_data", "write_shards",
]
