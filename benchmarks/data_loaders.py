"""How fast do the loaders serve tokens: pre-tokenized shards against streaming (tokenizing on the fly)?
And does the streaming loader's background thread hide its cost behind a training step?

    python benchmarks/data_loaders.py [--batches 200] [--seq-len 512] [--batch-size 16] [--step-ms 50]

The corpus is the bundled plays cut into ~2,000-character documents, written as 8 JSON-lines files
in a temporary directory. It is prepared into shards once (the `prepare` tokens/s), then each loader
serves the same number of micro-batches; ratios are taken in the same run. The last two lines
simulate a training step of --step-ms milliseconds (a sleep, which like a GPU step leaves the CPU
free) after every batch, with the stream read in the loop (prefetch 0) or 4 batches ahead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mhc_lm.config import DataConfig  # noqa: E402
from mhc_lm.data import bundled_documents, documents_for_prepare, make_train_loader, prepare_data, write_shards  # noqa: E402


def write_corpus(directory: Path, files: int = 8, chars: int = 2000) -> int:
    _, plays, _ = bundled_documents("shakespeare")
    docs = [play[i:i + chars] for play in plays for i in range(0, len(play), chars)]
    directory.mkdir(parents=True)
    for f in range(files):
        lines = [json.dumps({"text": d}) for d in docs[f::files]]
        (directory / f"train-{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return len(docs)


def tokens_per_s(loader, batches: int, step_s: float = 0.0) -> float:
    loader.next_batch()  # open the stream / fill the shuffle buffer outside the timing
    started, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += loader.next_batch()[:, 1:].numel()
        time.sleep(step_s)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--step-ms", type=float, default=50.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_docs = write_corpus(root / "corpus")
        stream_cfg = DataConfig(source="hub", path=str(root / "corpus"), val_docs=16, sample_docs=2000, vocab_size=8192,
                                seq_len=args.seq_len, cache_dir=str(root / "cache"))
        tokenizer, splits = documents_for_prepare(stream_cfg)
        started = time.perf_counter()
        manifest = write_shards(str(root / "shards"), tokenizer, splits, {}, shard_tokens=1 << 20)
        prepared = sum(s["tokens"] for s in manifest["splits"].values())
        prepare_rate = prepared / (time.perf_counter() - started)

        stream_data = prepare_data(stream_cfg)
        shards = make_train_loader(prepare_data(DataConfig(source="shards", dir=str(root / "shards"),
                                                           seq_len=args.seq_len)), args.batch_size, 0)
        stream_data.cfg.prefetch = 0
        shard_rate = tokens_per_s(shards, args.batches)
        stream_rate = tokens_per_s(make_train_loader(stream_data, args.batch_size, 0), args.batches)
        step_s, step_batches = args.step_ms / 1000, max(20, args.batches // 4)
        in_loop = tokens_per_s(make_train_loader(stream_data, args.batch_size, 0), step_batches, step_s)
        stream_data.cfg.prefetch = 4
        ahead = tokens_per_s(make_train_loader(stream_data, args.batch_size, 0), step_batches, step_s)
        step_only = args.batch_size * args.seq_len / step_s
    print(f"corpus: {n_docs:,} documents, {prepared:,} tokens (BPE of 8192) | seq_len {args.seq_len}, "
          f"batch {args.batch_size}, {args.batches} batches")
    print(f"prepare (tokenize + write shards): {prepare_rate:,.0f} tokens/s")
    print(f"shards loader:    {shard_rate:,.0f} tokens/s")
    print(f"streaming loader: {stream_rate:,.0f} tokens/s (shuffle buffer {stream_cfg.shuffle_buffer} blocks)")
    print(f"shards / streaming: {shard_rate / stream_rate:.1f}x")
    print(f"with a {args.step_ms:.0f} ms step per batch ({step_only:,.0f} tokens/s if data were free): "
          f"streaming in the loop {in_loop:,.0f} tokens/s, prefetching 4 batches {ahead:,.0f} tokens/s")
    print(f"prefetch / in the loop: {ahead / in_loop:.2f}x; prefetch reaches {ahead / step_only:.0%} of the step-bound rate")


if __name__ == "__main__":
    main()
