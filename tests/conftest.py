"""Shared fixtures. Tests never touch the network: the Hub is forced offline and W&B disabled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is read when a kernel
# is defined, so it is set here, before any test module imports mhc_lm.kernels.
if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a CPU test: tiny model, short blocks, a 512-token BPE.
TINY_RUN = [
    "model=tiny",
    "logger=none",
    "data.seq_len=32",
    "data.vocab_size=512",
    "trainer.batch_size=4",
    "trainer.eval_batches=2",
    "trainer.log_every=1",
    "optim.warmup_steps=2",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of the CLI (seconds each)")
    config.addinivalue_line("markers", "compat: the drift job of .ci/run runs these against the newest releases")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session (the bundled corpus is tokenized once)."""
    path = tmp_path_factory.mktemp("mhc_cache")
    os.environ["MHC_LM_CACHE"] = str(path)
    return path


def run_cli(script: str, *overrides: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run `python script overrides...` and return the CompletedProcess (stdout and stderr captured)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def train_cli(cache_dir, tmp_path):
    """Call train.py with the tiny settings, writing runs under tmp_path."""

    def run(*overrides: str, env: dict | None = None):
        given = {o.split("=", 1)[0] for o in overrides}
        defaults = [o for o in TINY_RUN if o.split("=", 1)[0] not in given]  # a test's override wins
        args = [*defaults, f"trainer.output_dir={tmp_path / 'runs'}", f"data.cache_dir={cache_dir}", *overrides]
        return run_cli("train.py", *args, env=env)

    return run


@pytest.fixture(scope="session")
def tiny_run(cache_dir, tmp_path_factory) -> Path:
    """One finished tiny mHC run shared by the eval, export and Hub tests: checkpoints at steps 4 and 8
    (both kept), validation every 4 steps, and RUN/export."""
    root = tmp_path_factory.mktemp("shared_runs")
    args = [*TINY_RUN, f"trainer.output_dir={root}", f"data.cache_dir={cache_dir}", "trainer.run_name=tiny",
            "trainer.max_steps=8", "trainer.ckpt_every=4", "trainer.eval_every=4", "trainer.num_threads=1"]
    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "tiny"
