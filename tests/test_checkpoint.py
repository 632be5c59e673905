"""Checkpoints carry a manifest; a damaged one costs only itself; a full disk is said as such (mhc_lm.checkpoint)."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mhc_lm import checkpoint as ckpt
from mhc_lm.checkpoint import (MANIFEST, checkpoint_damage, list_checkpoints, prepare_resume, resolve_resume,
                               save_checkpoint)
from mhc_lm.errors import ConfigError, DiskFullError

RUN_CONFIG = {"model": {"d_model": 8}, "residual": {"name": "mhc", "n": 2}}


class FakeAccelerator:
    """One process; `save_state` writes files shaped like accelerate's (weights, optimizer, RNG)."""

    is_main_process, process_index, num_processes = True, 0, 1

    def __init__(self, fail_after: int | None = None, error: BaseException | None = None):
        self.fail_after, self.error = fail_after, error

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        save_file({"w": torch.arange(64, dtype=torch.float32)}, os.path.join(folder, "model.safetensors"))
        if self.error is not None:
            Path(folder, "optimizer.bin").write_bytes(b"x" * 100)
            raise self.error
        torch.save({"state": torch.ones(32)}, os.path.join(folder, "optimizer.bin"))
        Path(folder, "random_states_0.pkl").write_bytes(os.urandom(40))


def save(run_dir: Path, step: int, accelerator=None) -> Path:
    return save_checkpoint(accelerator or FakeAccelerator(), run_dir, step, {"step": step, "tokens_seen": 0,
                           "train_time": 0.0}, {"position": step}, RUN_CONFIG, keep_last=3)


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    path = save(tmp_path, 4)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == ckpt.MANIFEST_FORMAT and manifest["version"] == ckpt.MANIFEST_VERSION
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk >= {"model.safetensors", "optimizer.bin", "trainer_state.json",
                                                 "run_config.json", "data_state_rank0.json"}
    weights = manifest["files"]["model.safetensors"]
    assert weights["size"] == (path / "model.safetensors").stat().st_size
    assert weights["sha256"] == ckpt.file_sha256(path / "model.safetensors")
    assert checkpoint_damage(path) is None


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))  # same size, other bytes


@pytest.mark.parametrize("damage,file,expected", [
    (truncate, "model.safetensors", "model.safetensors: {} bytes, the manifest says"),
    (scramble, "model.safetensors", "model.safetensors: its sha256 differs"),
    (truncate, "optimizer.bin", "optimizer.bin: {} bytes, the manifest says"),
    (truncate, "trainer_state.json", "trainer_state.json: {} bytes"),
    (Path.unlink, "model.safetensors", "model.safetensors: missing"),
    (Path.unlink, MANIFEST, "manifest.json: missing"),
    (lambda p: p.write_text("{"), MANIFEST, "manifest.json: unreadable"),
])
def test_auto_resume_skips_a_damaged_newest_checkpoint_and_an_explicit_one_is_refused(tmp_path, caplog, damage,
                                                                                       file, expected):
    intact, newest = save(tmp_path, 4), save(tmp_path, 8)
    damage(newest / file)
    size = (newest / file).stat().st_size if (newest / file).exists() else 0
    expected = expected.format(size)
    assert expected in checkpoint_damage(newest)
    with caplog.at_level(logging.WARNING, logger="mhc_lm.checkpoint"):
        assert resolve_resume("auto", tmp_path) == intact
    [line] = [r.getMessage() for r in caplog.records]
    assert f"skipped the damaged checkpoint {newest}" in line and expected in line
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == intact  # a run directory: the same rule
    with pytest.raises(ConfigError) as err:
        resolve_resume(str(newest), tmp_path)
    message = str(err.value)
    assert message.startswith(f"trainer.resume={str(newest)!r}: damaged checkpoint") and expected in message


def test_every_checkpoint_damaged_is_refused_not_a_silent_fresh_start(tmp_path):
    truncate(save(tmp_path, 4) / "model.safetensors")
    with pytest.raises(ConfigError, match=r"trainer.resume='auto': every checkpoint .* is damaged .*trainer.resume=none"):
        resolve_resume("auto", tmp_path)
    assert resolve_resume("auto", tmp_path / "fresh") is None


def test_prepare_resume_removes_stale_partial_saves_and_refuses_a_zero_checkpoint_on_other_process_counts(tmp_path):
    path = save(tmp_path, 4)
    stale = path.parent / ".tmp-step_000006"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert prepare_resume("auto", tmp_path, RUN_CONFIG, world_size=1) == path
    assert not stale.exists()
    (path / ckpt.DEEPSPEED_TAG).mkdir()  # as ZeRO writes it, here from one rank's data state
    with pytest.raises(ConfigError, match=r"partitions the optimizer over the 1 process\(es\) .* this run has 2"):
        prepare_resume("auto", tmp_path, RUN_CONFIG, world_size=2)
    with pytest.raises(ConfigError, match="residual.name='hc'"):
        prepare_resume("auto", tmp_path, {**RUN_CONFIG, "residual": {"name": "hc", "n": 2}}, world_size=1)


@pytest.mark.parametrize("error,free", [
    (OSError(errno.ENOSPC, "No space left on device"), 10_000),
    # torch's zip writer wraps the OSError; the free space tells it apart
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024"), 512),
    (SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), 0),
])
def test_a_full_disk_is_said_and_the_partial_directory_removed(tmp_path, monkeypatch, error, free):
    previous = save(tmp_path, 4)
    usage = ckpt.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=free))
    with pytest.raises(DiskFullError) as err:
        save(tmp_path, 8, FakeAccelerator(error=error))
    message = str(err.value)
    needed = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
    assert message.startswith("disk full: the checkpoint step_000008 in") and f"needs about {needed:,} bytes" in message
    assert f"{free:,} are free" in message and "\n" not in message
    assert sorted(p.name for p in previous.parent.iterdir()) == ["step_000004"]  # no .tmp- left, previous intact
    assert checkpoint_damage(previous) is None


def test_another_write_error_with_space_left_is_not_called_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save(tmp_path, 4, FakeAccelerator(error=RuntimeError("unexpected pos")))
    assert list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_run_resumes_exactly_from_the_intact_checkpoint_before_a_damaged_one(tiny_run, cache_dir, tmp_path):
    """tiny_run checkpointed steps 4 and 8; with step 8's weights truncated, `auto` continues from step 4 and
    trains steps 5..8 to the same losses."""
    import shutil

    from conftest import TINY_RUN, run_cli

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    truncate(run_dir / "checkpoints" / "step_000008" / "model.safetensors")
    result = run_cli("train.py", *TINY_RUN, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
                     "trainer.max_steps=8", "trainer.ckpt_every=4", "trainer.eval_every=4", "trainer.num_threads=1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    skipped = [line for line in out.splitlines() if "skipped the damaged checkpoint" in line]
    assert len(skipped) == 1 and "step_000008 (model.safetensors:" in skipped[0]
    assert f"Resumed from {run_dir / 'checkpoints' / 'step_000004'} at step 4" in out
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["train/loss"]) for m in metrics if "train/loss" in m]
    first = dict(losses[:8])  # the original run's steps 1..8, then the resumed steps 5..8
    assert [s for s, _ in losses[8:]] == [5, 6, 7, 8] and all(first[s] == loss for s, loss in losses[8:])
    assert checkpoint_damage(run_dir / "checkpoints" / "step_000008") is None  # saved again, intact


def test_eval_and_the_hub_refuse_a_damaged_checkpoint_naming_the_file(tmp_path):
    from mhc_lm.model_sources import resolve_sources

    path = save(tmp_path, 4)
    assert resolve_sources(str(path))[0].step == 4
    truncate(path / "trainer_state.json")
    for spec in (str(path), str(tmp_path)):  # the checkpoint, or the run directory standing for its newest
        with pytest.raises(ConfigError, match=r"^models='.*step_000004': damaged checkpoint, trainer_state.json: "):
            resolve_sources(spec)
