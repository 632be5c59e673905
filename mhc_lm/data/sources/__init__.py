"""The data sources (`data.source`), one module each behind `@register`, like the residual mixers.

| data.source | training data | loader |
|---|---|---|
| bundled, local | documents tokenized once, cached as .npy | BlockLoader |
| shards | memory-mapped shards written by `python -m mhc_lm.data prepare` | BlockLoader |
| hub | documents streamed, tokenized and packed on the fly | StreamLoader |

Importing this package registers every source; `validate_data` checks the options every source shares,
then the source's own.
"""

import os

from ...errors import check_choice, check_min, check_range, check_writable_dir, fail
from ..config import DataConfig
from ..tokenizer import check_tokenizer
from . import bundled, local, hub, shards  # noqa: F401, I001  (registration, in the order error messages list them)
from .base import SOURCES, DataSource, TokenData, register, source_of
from .documents import DocumentSource, tokenize_documents


def validate_data(data: DataConfig, max_seq_len: int) -> None:
    """Check the `data` section of a run whose model reads up to `max_seq_len` tokens; ConfigError if bad."""
    check_choice("data.source", data.source, tuple(SOURCES))
    check_min("data.seq_len", data.seq_len, 1)
    if data.seq_len > max_seq_len:
        fail("data.seq_len", data.seq_len,
             f"longer than the model's context model.max_seq_len={max_seq_len}; allowed: <= {max_seq_len}")
    check_range("data.val_fraction", data.val_fraction, 0, 1, low_open=True, high_open=True)
    check_tokenizer(data.tokenizer)
    if data.tokenizer == "bpe":
        check_min("data.vocab_size", data.vocab_size, 257)  # 256 bytes + the end-of-text token
    check_min("data.num_proc", data.num_proc, 1)
    if data.cache_dir or os.environ.get("MHC_LM_CACHE"):
        check_writable_dir("data.cache_dir" if data.cache_dir else "MHC_LM_CACHE",
                           data.cache_dir or os.environ["MHC_LM_CACHE"])
    SOURCES[data.source].validate(data)


__all__ = ["SOURCES", "DataSource", "DocumentSource", "TokenData", "register", "source_of", "tokenize_documents",
           "validate_data"]
