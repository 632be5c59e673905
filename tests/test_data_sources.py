"""Streaming, pre-tokenized shards and exact per-rank resume, for every source.

The streamed dataset is a local directory of JSON-lines files read through the same
`load_dataset(..., streaming=True)` call as a Hub dataset (no network).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from data_worker import AFTER, SKIP, SOURCES, data_config, write_corpus
from mhc_lm.errors import ConfigError
from mhc_lm.data import (BlockLoader, ShardedTokens, StreamLoader, documents_for_prepare, encode_texts,
                         make_train_loader, prepare_data, state_for_rank, write_shards)
from mhc_lm.data import tokenizer as tokenizer_mod

WORKER = Path(__file__).with_name("data_worker.py")


@pytest.fixture(scope="module")
def root(tmp_path_factory, cache_dir) -> Path:
    """A corpus of 4 JSON-lines files (48 documents), its shards, and warm tokenizer caches."""
    root = tmp_path_factory.mktemp("data_sources")
    write_corpus(root / "corpus")
    tokenizer, splits = documents_for_prepare(data_config("hub", root))
    write_shards(str(root / "shards"), tokenizer, splits, {"test": True}, shard_tokens=500)
    prepare_data(data_config("bundled", root))
    return root


def blocks_of_epoch(loader, epoch: int = 0) -> list[tuple]:
    """Blocks (as tuples) a batch-size-1 loader serves in `epoch`, in order."""
    blocks = []
    while True:
        batch = loader.next_batch()
        if loader.epoch > epoch:
            return blocks
        blocks.append(tuple(batch[0].tolist()))


def stream_loader(root: Path, rank: int = 0, world_size: int = 1, batch_size: int = 1, **overrides) -> StreamLoader:
    return make_train_loader(prepare_data(data_config("hub", root, **overrides)), batch_size, 7, rank, world_size)


# ---------------------------------------------------------------------------------------------
# Resume: the batches after a resume equal those of an uninterrupted run (real processes)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_the_batches_after_a_resume_equal_an_uninterrupted_run(root, world_size):
    for phase in ("run", "resume"):  # separate launches: the resumed loaders live in fresh processes
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={world_size}", str(WORKER), str(root), phase],
                                capture_output=True, text=True, timeout=600, cwd=ROOT)
        out = root / f"world{world_size}"
        done = [(out / f"{phase}-rank{r}.done").exists() for r in range(world_size)]
        assert all(done), result.stderr[-4000:]  # judged by what the ranks wrote, not the exit code
    for source in SOURCES:
        served = []
        for rank in range(world_size):
            full = np.load(out / f"{source}-rank{rank}-full.npy")
            resumed = np.load(out / f"{source}-rank{rank}-resumed.npy")
            assert full.shape == (SKIP + AFTER, 2, data_config(source, root).seq_len + 1)
            assert np.array_equal(resumed, full[SKIP:]), f"{source} rank {rank}"
            served.append(full)
        if world_size == 2:  # the ranks read different data
            assert not np.array_equal(served[0], served[1])


@pytest.mark.parametrize("prefetch", [0, 4])
def test_a_stream_resumes_exactly_anywhere_even_twice_and_across_epochs(root, prefetch):
    straight = stream_loader(root, batch_size=3, prefetch=0)
    reference = [straight.next_batch() for _ in range(120)]
    assert straight.epoch >= 1  # the comparison crosses an epoch boundary and its drained buffer
    for stops in ([0], [1], [7, 8], [33, 90], [64, 65, 119]):
        loader, position = stream_loader(root, batch_size=3, prefetch=prefetch), 0
        for stop in stops:
            while position < stop:
                assert torch.equal(loader.next_batch(), reference[position]), (stops, position)
                position += 1
            state = json.loads(json.dumps(loader.state_dict()))  # with prefetch: the batches served, not made
            loader = stream_loader(root, batch_size=3, prefetch=prefetch)
            loader.load_state_dict(state)
        assert all(torch.equal(loader.next_batch(), reference[p]) for p in range(position, 120)), stops


# ---------------------------------------------------------------------------------------------
# Epochs: every packed block once across ranks


@pytest.mark.parametrize("source", ["bundled", "shards"])
def test_an_epoch_of_blocks_shows_every_block_once_across_ranks(root, source):
    data = prepare_data(data_config(source, root))
    batch = 64 if source == "bundled" else 3
    ranks = [BlockLoader(data.train, data.cfg.seq_len, batch, 7, r, 2) for r in (0, 1)]
    seen = [tuple(row.tolist()) for _ in range(ranks[0].steps_per_epoch) for r in ranks for row in r.next_batch()]
    everything = BlockLoader(data.train, data.cfg.seq_len, 1, 0, shuffle=False)
    all_blocks = [tuple(everything.next_batch()[0].tolist()) for _ in range(everything.blocks)]
    assert len(set(seen)) == len(seen) == ranks[0].steps_per_epoch * 2 * batch
    assert set(seen) <= set(all_blocks) and len(all_blocks) - len(seen) < 2 * batch  # only the short tail waits
    next_epoch = [tuple(row.tolist()) for r in ranks for row in r.next_batch()]
    assert ranks[0].epoch == 1 and next_epoch != seen[:2 * batch]


def test_a_stream_epoch_shows_every_block_of_each_rank_once(root):
    corpus = [json.loads(line)["text"] for f in sorted((root / "corpus").glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    rank_docs = []
    for rank in (0, 1):
        in_order = stream_loader(root, rank, 2, shuffle_buffer=0)  # shard order shuffled, blocks in order
        shuffled = stream_loader(root, rank, 2)  # plus the block buffer
        ordered_blocks, shuffled_blocks = blocks_of_epoch(in_order), blocks_of_epoch(shuffled)
        assert sorted(ordered_blocks) == sorted(shuffled_blocks) and ordered_blocks != shuffled_blocks
        # In order, the blocks are this rank's documents packed: overlapping by one, every token once.
        docs = list(in_order.source.texts(in_order.source.open(0, 7, True, rank, 2)))
        stream = [t for ids in encode_texts(in_order.tokenizer, docs) for t in ids]
        seq_len = in_order.seq_len
        assert len(ordered_blocks) == (len(stream) - 1) // seq_len
        assert [t for block in ordered_blocks for t in block[:-1]] == stream[:len(ordered_blocks) * seq_len]
        rank_docs.append(docs)
    reserved = 4  # val_docs: the first documents of the stream are validation, never trained on
    assert sorted(rank_docs[0] + rank_docs[1]) == sorted(corpus[reserved:])


# ---------------------------------------------------------------------------------------------
# prepare -> shards


def test_prepare_then_shards_gives_the_tokens_of_the_stream(root, tmp_path):
    out = tmp_path / "prepared"
    result = subprocess.run([sys.executable, "-m", "mhc_lm.data", "prepare", "hub", "--out", str(out),
                             f"data.path={root / 'corpus'}", "data.val_docs=4", "data.sample_docs=40",
                             "data.vocab_size=300", "--shard-tokens", "700"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens/s" in result.stdout and "Tokenizing train" in result.stderr  # the figure and the progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 300 and train["documents"] == 44
    assert len(train["shards"]) > 2 and sum(s["tokens"] for s in train["shards"]) == train["tokens"]
    assert all((out / s["file"]).stat().st_size == 2 * s["tokens"] for s in train["shards"])

    shards = prepare_data(data_config("shards", root, dir=str(out), shuffle=False))
    stream = stream_loader(root, shuffle=False)
    assert shards.tokenizer.get_vocab() == stream.tokenizer.get_vocab() and shards.eot_id == manifest["eot_id"]
    assert np.array_equal(shards.validation, prepare_data(data_config("hub", root)).validation)
    in_order = BlockLoader(shards.train, 16, 1, 7, shuffle=False)
    from_shards = [tuple(in_order.next_batch()[0].tolist()) for _ in range(in_order.blocks)]
    assert from_shards == blocks_of_epoch(stream)  # the same blocks, in the same order
    shards.tokenizer.save_pretrained(tmp_path / "same")  # eval.py names the model's tokenizer: the same one is fine
    assert np.array_equal(prepare_data(data_config("shards", root, dir=str(out), tokenizer=str(tmp_path / "same")))
                          .validation, shards.validation)
    prepare_data(data_config("bundled", root)).tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="data.tokenizer=.*other.*was tokenized with another tokenizer"):
        prepare_data(data_config("shards", root, dir=str(out), tokenizer=str(tmp_path / "other")))
    shuffled = make_train_loader(prepare_data(data_config("shards", root, dir=str(out))), 4, 7)
    epoch = [tuple(row.tolist()) for _ in range(shuffled.steps_per_epoch) for row in shuffled.next_batch()]
    assert len(set(epoch)) == len(epoch) and set(epoch) <= set(from_shards)


def test_prepare_from_a_yaml_file_stops_at_a_document_end_and_refuses_bad_input(root, tmp_path, capsys):
    from mhc_lm.data.__main__ import main

    config = tmp_path / "corpus.yaml"
    config.write_text(f"source: hub\npath: {root / 'corpus'}\nval_docs: 4\nsample_docs: 40\nvocab_size: 512\n")
    out = tmp_path / "limited"
    assert main(["prepare", str(config), "--out", str(out), "data.vocab_size=300", "--max-tokens", "1000"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["vocab_size"] == 300 and manifest["source"]["path"] == str(root / "corpus")
    train = prepare_data(data_config("shards", root, dir=str(out))).train
    assert 1000 <= len(train) < 1000 + 200 and train[len(train) - 1:][0] == manifest["eot_id"]
    for argv, message in [
        (["prepare", str(config), "--out", str(out)], f"--out='{out}': exists and is not empty"),
        (["prepare", "nope", "--out", str(tmp_path / "x")], "DATA_CONFIG='nope': no such data group or file; "
                                                           "allowed: bundled, hub, local"),
        (["prepare", "hub", "--out", str(tmp_path / "x")], "data.path=None: data=hub needs a dataset"),
        (["prepare", "hub", "--out", str(tmp_path / "x"), "trainer.max_steps=3"], "prepare takes data options only"),
        (["prepare", str(config), "--out", str(tmp_path / "x"), "--shard-tokens", "0"], "--shard-tokens=0"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_prepare_of_local_files_gives_the_cached_token_stream(local_files, tmp_path):
    from mhc_lm.config import DataConfig
    from mhc_lm.data.__main__ import main

    files = str(local_files / "*.txt")
    assert main(["prepare", "local", "--out", str(tmp_path / "out"), f"data.files=[{files}]", "data.vocab_size=300",
                 "data.val_fraction=0.2", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    cached = prepare_data(DataConfig(source="local", files=[files], vocab_size=300, val_fraction=0.2, seq_len=16,
                                     cache_dir=str(tmp_path / "cache")))
    shards = prepare_data(DataConfig(source="shards", dir=str(tmp_path / "out"), seq_len=16))
    assert np.array_equal(shards.train[:], cached.train) and np.array_equal(shards.validation, cached.validation)


@pytest.fixture
def local_files(tmp_path):
    for i, doc in enumerate(write_corpus(tmp_path / "jsonl", files=1, docs_per_file=10)):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc)
    return tmp_path


def test_sharded_tokens_slice_across_shard_ends(tmp_path):
    counts = [5, 0, 1, 7, 3]
    tokens = np.arange(sum(counts), dtype=np.uint32) * 3
    paths, start = [], 0
    for i, count in enumerate(counts):
        paths.append(tmp_path / f"s{i}.bin")
        tokens[start:start + count].astype("<u4").tofile(paths[-1])
        start += count
    stream = ShardedTokens(paths, counts, "uint32")
    assert len(stream) == len(tokens)
    for a in range(len(tokens) + 1):
        for b in range(a, len(tokens) + 1):
            assert np.array_equal(stream[a:b], tokens[a:b]), (a, b)


# ---------------------------------------------------------------------------------------------
# Streaming specifics


def test_a_validation_split_is_used_when_the_dataset_has_one(tmp_path):
    docs = write_corpus(tmp_path / "corpus", files=2, docs_per_file=10)
    held_out = ["held out one: a lazy dog.", "held out two: seven wizards."]
    (tmp_path / "corpus" / "validation.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in held_out))
    data = prepare_data(data_config("hub", tmp_path, sample_docs=10, cache_dir=str(tmp_path / "cache")))
    assert data.stream.exclude == frozenset()  # nothing reserved from the training stream
    expected = [t for ids in encode_texts(data.tokenizer, held_out) for t in ids]
    assert data.validation.tolist() == expected
    loader = make_train_loader(data, 1, 7)
    trained = list(loader.source.texts(loader.source.open(0, 7, False, 0, 1)))
    assert trained == docs


def test_an_uneven_shard_count_warns_and_still_partitions(tmp_path):
    docs = write_corpus(tmp_path / "corpus", files=3, docs_per_file=6)
    data = prepare_data(data_config("hub", tmp_path, val_docs=2, sample_docs=5, cache_dir=str(tmp_path / "cache")))
    with pytest.warns(UserWarning, match="3 shard.* not a multiple of the 2 processes"):
        parts = [list(data.stream.texts(data.stream.open(0, 7, True, r, 2))) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(docs[2:]) and abs(len(parts[0]) - len(parts[1])) <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.stream.open(0, 7, True, 0, 3)  # 3 shards on 3 processes: no warning


def test_a_stream_state_refuses_another_world_size(root):
    states = [stream_loader(root, r, 2).state_dict() for r in (0, 1)]
    with pytest.raises(ConfigError, match=r"saved by 2 process\(es\), this run has 1; .* allowed: resume with 2"):
        state_for_rank(states, 0, 1, "ckpt")
    with pytest.raises(ConfigError, match="saved by 2 process"):
        stream_loader(root, 0, 1).load_state_dict(states[0])
    with pytest.raises(ConfigError, match="seq_len=16, this run has 32"):
        stream_loader(root, 0, 2, seq_len=32).load_state_dict(states[0])


def test_streamed_bpe_is_trained_on_the_sample_once_and_a_hf_tokenizer_works(root, monkeypatch, tmp_path):
    first = prepare_data(data_config("hub", root))
    monkeypatch.setattr(tokenizer_mod, "train_bpe", lambda *a, **k: pytest.fail("the BPE was trained twice"))
    again = prepare_data(data_config("hub", root))
    assert first.tokenizer.get_vocab() == again.tokenizer.get_vocab() and len(first.tokenizer) == 300
    saved = tmp_path / "tok"
    first.tokenizer.save_pretrained(saved)
    by_path = prepare_data(data_config("hub", root, tokenizer=str(saved)))
    assert np.array_equal(by_path.validation, first.validation)
    assert len(first.unigram_sample) > 1000  # the sample documents, tokenized


def test_a_missing_text_column_names_the_columns(root):
    with pytest.raises(ConfigError, match="data.text_field='body': no such column .* allowed: text, id"):
        prepare_data(data_config("hub", root, text_field="body"))
    with pytest.raises(ConfigError, match="data.split='dev': .* has no such split; allowed: train"):
        prepare_data(data_config("hub", root, split="dev"))
    with pytest.raises(ConfigError, match="data.val_docs=48: .* too few documents"):
        prepare_data(data_config("hub", root, val_docs=48))
