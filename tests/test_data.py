"""Documents, the tokenizer cache, packing with end-of-text tokens, and the resumable block loader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mhc_lm.data.sources import documents as document_sources
from mhc_lm.data import tokenizer as tokenizer_mod
from mhc_lm.data import DataConfig
from mhc_lm.errors import ConfigError
from mhc_lm.data import (BlockLoader, eval_batches, gather_blocks, load_documents, prepare_data, state_for_rank,
                         unigram_loss)

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hum and boxing kings fight".split()


def synthetic_docs(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(30, 80)))) + "." for _ in range(count)]


@pytest.fixture
def local_txt(tmp_path):
    docs = synthetic_docs(12)
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc)
    return tmp_path, docs


def local_cfg(tmp_path, **kw) -> DataConfig:
    defaults = dict(source="local", files=[str(tmp_path / "*.txt")], vocab_size=300, seq_len=16,
                    cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    return DataConfig(**{**defaults, **kw})


def test_bundled_corpus_is_split_by_play(cache_dir):
    docs, _ = load_documents(DataConfig(cache_dir=str(cache_dir)))
    train, val = list(docs["train"]["text"]), list(docs["validation"]["text"])
    assert len(train) + len(val) == 38 and len(val) == math.ceil(0.05 * 38)
    assert set(train).isdisjoint(val)
    assert all(len(t) > 50_000 for t in val)  # whole plays, not fragments
    assert "**" not in train[0]  # the Markdown is stripped


def test_local_txt_one_document_per_file_and_eot_packing(local_txt):
    tmp_path, docs = local_txt
    cfg = local_cfg(tmp_path)
    prepared = prepare_data(cfg)
    split, _ = load_documents(cfg)
    assert len(split["train"]) + len(split["validation"]) == 12 and set(split["train"]["text"]) <= set(docs)
    tok, eot = prepared.tokenizer, prepared.eot_id
    expected = []
    for text in split["train"]["text"]:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [eot]
    assert prepared.train.tolist() == expected
    assert int((prepared.train == eot).sum()) == len(split["train"])


def test_tokenizer_and_tokens_are_cached(local_txt, monkeypatch):
    tmp_path, _ = local_txt
    cfg = local_cfg(tmp_path)
    first = prepare_data(cfg)
    monkeypatch.setattr(tokenizer_mod, "train_bpe", lambda *a, **k: pytest.fail("the BPE was trained twice"))
    monkeypatch.setattr(document_sources, "tokenize_documents", lambda *a, **k: pytest.fail("tokenized twice"))
    second = prepare_data(cfg)
    assert np.array_equal(first.train, second.train)
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    assert len(first.tokenizer) == 300


def test_hf_tokenizer_by_path(local_txt):
    tmp_path, _ = local_txt
    ours = prepare_data(local_cfg(tmp_path))
    saved = tmp_path / "saved_tokenizer"
    ours.tokenizer.save_pretrained(saved)
    by_path = prepare_data(local_cfg(tmp_path, tokenizer=str(saved)))
    assert np.array_equal(by_path.train, ours.train)


def test_jsonl_and_parquet_with_a_text_field(tmp_path):
    docs = synthetic_docs(10, seed=1)
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs[:6]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs[6:], "id": list(range(4))}), tmp_path / "b.parquet")
    cfg = DataConfig(source="local", files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")],
                     text_field="body", val_files=[], val_fraction=0.2, vocab_size=300, seq_len=8,
                     cache_dir=str(tmp_path / "cache"))
    split, _ = load_documents(cfg)
    assert sorted(list(split["train"]["text"]) + list(split["validation"]["text"])) == sorted(docs)
    with pytest.raises(ConfigError, match="data.text_field='content'"):
        load_documents(DataConfig(**{**cfg.__dict__, "text_field": "content"}))


def test_explicit_validation_files(local_txt):
    tmp_path, docs = local_txt
    cfg = local_cfg(tmp_path, val_files=[str(tmp_path / "doc00.txt")])
    split, _ = load_documents(cfg)
    assert list(split["validation"]["text"]) == [docs[0]]
    assert docs[0] not in list(split["train"]["text"]) and len(split["train"]) == 11


def test_a_single_document_cannot_be_split(tmp_path):
    (tmp_path / "only.txt").write_text("just one document")
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_documents(local_cfg(tmp_path))


def test_blocks_overlap_by_one_so_every_token_is_a_target_once():
    tokens = np.arange(103, dtype=np.uint16)
    seq_len = 10
    blocks = gather_blocks(tokens, range(10), seq_len)
    assert blocks.shape == (10, 11)
    assert torch.equal(blocks[1, 0], blocks[0, -1])
    targets = blocks[:, 1:].flatten().tolist()
    assert targets == list(range(1, 101))  # every token after the first, once


def test_loader_epochs_shards_and_exact_resume():
    tokens = np.arange(10 * 8 + 1, dtype=np.uint16)  # 10 blocks of 8
    ranks = [BlockLoader(tokens, 8, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 2  # 10 blocks // (2 * 2): the last 2 wait for the next epoch
    epoch0 = [r.next_batch()[:, 0].tolist() for _ in range(2) for r in ranks]
    first_tokens = [t for batch in epoch0 for t in batch]
    assert len(set(first_tokens)) == 8  # no block twice in an epoch, across ranks
    assert all(t % 8 == 0 for t in first_tokens)
    # Resume: a fresh loader restored from the state gives the same next batches.
    state = ranks[0].state_dict()
    expected = [ranks[0].next_batch() for _ in range(5)]
    restored = BlockLoader(tokens, 8, batch_size=2, seed=3, rank=0, world_size=2)
    restored.load_state_dict(state)
    assert all(torch.equal(a, restored.next_batch()) for a in expected)
    with pytest.raises(ConfigError, match="seed=3"):
        BlockLoader(tokens, 8, batch_size=2, seed=4, rank=0, world_size=2).load_state_dict(state)


def test_loader_resumes_with_another_world_size_at_the_same_global_position():
    """Two ranks of 2 blocks stop; one rank of 4 blocks continues with exactly the blocks they would take."""
    tokens = np.arange(24 * 8 + 1, dtype=np.uint16)
    ranks = [BlockLoader(tokens, 8, batch_size=2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        for r in ranks:
            r.next_batch()
    states = [r.state_dict() for r in ranks]
    expected = [torch.cat([r.next_batch() for r in ranks]) for _ in range(8)]  # crosses into epoch 1
    single = BlockLoader(tokens, 8, batch_size=4, seed=5, rank=0, world_size=1)
    single.load_state_dict(state_for_rank(states, rank=0, world_size=1))
    assert all(torch.equal(e, single.next_batch()) for e in expected)
    assert single.epoch == 1


def test_loader_refuses_a_batch_larger_than_the_data():
    with pytest.raises(ConfigError, match="trainer.batch_size=8"):
        BlockLoader(np.arange(50, dtype=np.uint16), 8, batch_size=8, seed=0)


def test_eval_batches_cover_the_first_blocks_once_across_ranks():
    tokens = np.arange(20 * 4 + 1, dtype=np.uint16)
    seen = [b[:, 0].tolist() for r in (0, 1) for b in eval_batches(tokens, 4, 3, 2, rank=r, world_size=2)]
    flat = sorted(t for batch in seen for t in batch)
    assert flat == [4 * i for i in range(12)]


def test_unigram_loss_by_hand():
    train = np.array([0, 0, 1, 2], dtype=np.uint16)
    val = np.array([0, 1], dtype=np.uint16)
    counts = np.array([3.0, 2.0, 2.0, 1.0])  # add-one over a vocabulary of 4
    p = counts / counts.sum()
    assert unigram_loss(train, val, 4) == pytest.approx(-(np.log(p[0]) + np.log(p[1])) / 2)


def test_a_state_without_the_current_version_or_kind_is_refused():
    tokens = np.arange(24 * 8 + 1, dtype=np.uint16)
    loader = BlockLoader(tokens, 8, batch_size=2, seed=5, rank=1, world_size=2)
    unversioned = {"epoch": 0, "cursor": 3, "seed": 5, "blocks": 24, "batch_size": 2, "world_size": 2, "rank": 1}
    with pytest.raises(ConfigError, match="data state has version None, this mhc-lm reads version 1"):
        loader.load_state_dict(unversioned)
    kindless = {k: v for k, v in loader.state_dict().items() if k != "kind"}
    with pytest.raises(ConfigError, match="of kind None, this run's data source gives 'blocks'"):
        loader.load_state_dict(kindless)