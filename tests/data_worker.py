"""One rank of the data-resume tests: builds each source's loader and writes the batches it serves.

    torchrun --standalone --nproc_per_node N tests/data_worker.py ROOT run     # uninterrupted, and stopped
    torchrun --standalone --nproc_per_node N tests/data_worker.py ROOT resume  # fresh processes resume

`run` writes, per source and rank, SKIP + AFTER batches of an uninterrupted loader and the state of a
second loader stopped after SKIP batches. `resume` loads those states in new processes (resuming twice:
after 40 more batches the state is saved and loaded again) and writes the AFTER batches that follow.
The test compares the files, so a gloo rank that aborts at exit after finishing does not matter.
The test module imports the corpus and configurations from here too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

SOURCES = ("bundled", "hub", "shards")
SKIP, AFTER, SECOND_STOP = 30, 100, 40
BATCH, SEED = 2, 7
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hum and boxing kings fight".split()


def write_corpus(directory: Path, files: int = 4, docs_per_file: int = 12) -> list[str]:
    """JSON-lines files train-*.jsonl of distinct synthetic documents; returns the documents in file order."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    docs = []
    for f in range(files):
        lines = []
        for _ in range(docs_per_file):
            docs.append(f"doc {len(docs)}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(10, 60)))) + ".")
            lines.append(json.dumps({"text": docs[-1], "id": len(docs)}))
        (directory / f"train-{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return docs


def data_config(source: str, root: Path, **overrides):
    from mhc_lm.config import DataConfig

    settings = {
        "bundled": dict(source="bundled", seq_len=32, vocab_size=512),  # the tokens train.py's tests cache too
        "hub": dict(source="hub", path=str(root / "corpus"), val_docs=4, sample_docs=40, vocab_size=300, seq_len=16,
                    shuffle_buffer=8),
        "shards": dict(source="shards", dir=str(root / "shards"), seq_len=16),
    }[source]
    return DataConfig(**{**settings, **overrides})


def build_loader(source: str, root: Path, rank: int, world_size: int):
    from mhc_lm.data import make_train_loader, prepare_data

    data = prepare_data(data_config(source, root))
    return make_train_loader(data, BATCH, SEED, rank, world_size)


def take(loader, count: int) -> np.ndarray:
    return np.stack([loader.next_batch().numpy() for _ in range(count)])


def round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


def run(root: Path, rank: int, world_size: int, out: Path) -> None:
    for source in SOURCES:
        np.save(out / f"{source}-rank{rank}-full.npy", take(build_loader(source, root, rank, world_size), SKIP + AFTER))
        stopped = build_loader(source, root, rank, world_size)
        take(stopped, SKIP)
        (out / f"{source}-rank{rank}-state.json").write_text(json.dumps(stopped.state_dict()))


def resume(root: Path, rank: int, world_size: int, out: Path) -> None:
    from mhc_lm.data import state_for_rank

    for source in SOURCES:
        states = [json.loads((out / f"{source}-rank{r}-state.json").read_text()) for r in range(world_size)]
        first = build_loader(source, root, rank, world_size)
        first.load_state_dict(state_for_rank(states, rank, world_size))
        head = take(first, SECOND_STOP)
        second = build_loader(source, root, rank, world_size)
        second.load_state_dict(round_trip(first.state_dict()))
        np.save(out / f"{source}-rank{rank}-resumed.npy", np.concatenate([head, take(second, AFTER - SECOND_STOP)]))


def main() -> None:
    root, phase = Path(sys.argv[1]), sys.argv[2]
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = root / f"world{world_size}"
    out.mkdir(exist_ok=True)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    {"run": run, "resume": resume}[phase](root, rank, world_size, out)
    (out / f"{phase}-rank{rank}.done").write_text("ok")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
