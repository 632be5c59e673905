"""The per-rank data state saved with every checkpoint (`data_state_rank{r}.json`), version 1.

Every loader's `state_dict()` is a JSON object with `"version": 1` and a `"kind"`:

- `"blocks"` (bundled, local, shards: a finite packed token stream, map-style): `epoch`, `offset` (blocks
  of this epoch's permutation consumed by all ranks together), `seed`, `shuffle`, `blocks`, `seq_len`,
  and for information `batch_size`, `world_size`, `rank`. The state is the same on every rank and does
  not depend on the world size, so a run may resume with another number of processes or batch size:
  it continues at the same place of the same permutation.
- `"stream"` (hub: documents streamed and packed on the fly): `epoch`, `emitted` (blocks this rank
  emitted this epoch), `docs` (documents it read this epoch), `hf_state` (the `datasets`
  IterableDataset's `state_dict()` after the last document read, null at an epoch's start), `carry`
  (tokens read but not yet in a block) and `pool` (packed blocks waiting in the shuffle buffer), plus
  `seed`, `shuffle`, `shuffle_buffer`, `seq_len`, `rank`, `world_size`, `source` (a fingerprint of
  the dataset, split and tokenizer) and `datasets_version`. Each rank reads its own shards, so a
  streaming state only resumes with the same number of processes.

Arrays are `{"dtype": "uint32", "shape": [...], "base64": ...}` (little-endian raw bytes).
"""

from __future__ import annotations

import base64

import numpy as np

from ..errors import ConfigError

STATE_VERSION = 1


def encode_array(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<"))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "base64": base64.b64encode(array.tobytes()).decode()}


def decode_array(data: dict) -> np.ndarray:
    raw = base64.b64decode(data["base64"])
    return np.frombuffer(raw, dtype=np.dtype(data["dtype"]).newbyteorder("<")).reshape(data["shape"]).copy()


def check_state(state: dict, kind: str, expected: dict) -> None:
    """Refuse a saved state of another version, kind or configuration (the keys of `expected`)."""
    version = state.get("version")
    if version != STATE_VERSION:
        raise ConfigError(f"trainer.resume: the checkpoint's data state has version {version}, this mhc-lm reads "
                          f"version {STATE_VERSION}; allowed: resume with the mhc-lm that wrote it")
    if state.get("kind") != kind:
        raise ConfigError(f"trainer.resume: the checkpoint's data state is of kind {state.get('kind')!r}, this run's "
                          f"data source gives {kind!r}; allowed: resume with the same data source")
    for key, value in expected.items():
        if key in state and state[key] != value:
            raise ConfigError(f"trainer.resume: the checkpoint's data loader has {key}={state[key]!r}, this run has "
                              f"{value!r}; allowed: resume with the same data, data.seq_len, data.shuffle and seed")


def state_for_rank(states: list[dict], rank: int, world_size: int, checkpoint: str = "") -> dict:
    """The saved data state this rank resumes from; `states[r]` was saved by rank r.

    With the same world size, each rank takes its own. With another one, a `"blocks"` state (the same on
    every rank, expressed in blocks consumed by all ranks) is shared; a `"stream"` state is refused.
    """
    if len(states) == world_size:
        return states[rank]
    kinds = {s.get("kind") for s in states}
    if kinds == {"blocks"}:
        positions = {(s["epoch"], s["offset"]) for s in states}
        if len(positions) != 1:
            raise ConfigError(f"trainer.resume={checkpoint!r}: the ranks saved different data positions {positions}")
        return states[0]
    raise ConfigError(f"trainer.resume={checkpoint!r}: its streaming data state was saved by {len(states)} "
                      f"process(es), this run has {world_size}; each process streams its own shards, so the position "
                      f"cannot be split differently; allowed: resume with {len(states)} process(es)")

