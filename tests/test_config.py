"""Every shipped YAML composes and validates; bad values stop the run with one clear message."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mhc_lm.config import TrainConfig, compose_config, validate
from mhc_lm.errors import ConfigError
from mhc_lm.checkpoint import check_compatible

from conftest import ROOT

CONF = ROOT / "conf"


def composed(*overrides: str) -> TrainConfig:
    return compose_config(["trainer.run_name=test", *overrides])


def group_options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir()):
        for yaml_file in sorted(group.glob("*.yaml")):
            yield group.name, yaml_file.stem


@pytest.mark.compat
@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_yaml_composes_and_validates(group, option, tmp_path):
    text_file = tmp_path / "a.txt"
    text_file.write_text("hello")
    extra = {("data", "local"): [f"data.files=[{text_file}]"], ("data", "hub"): [f"data.path={tmp_path}"],
             ("data", "shards"): [f"data.dir={minimal_shard_dir(tmp_path / 'shards')}"]}.get((group, option), [])
    cfg = composed(f"{group}={option}", *extra)
    assert isinstance(cfg, TrainConfig)
    validate(cfg)


def minimal_shard_dir(root: Path) -> Path:
    """The smallest directory `read_manifest` accepts: one train and one validation shard of uint16 tokens."""
    (root / "tokenizer").mkdir(parents=True)
    splits = {}
    for split, count in (("train", 10), ("validation", 3)):
        (root / f"{split}-00000.bin").write_bytes(bytes(2 * count))
        splits[split] = {"shards": [{"file": f"{split}-00000.bin", "tokens": count}], "tokens": count, "documents": 1}
    manifest = {"format": "mhc-lm-token-shards", "version": 1, "dtype": "uint16", "eot_id": 0, "vocab_size": 300,
                "tokenizer": "tokenizer", "splits": splits, "source": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_default_run_is_small_mhc_with_four_streams_on_the_bundled_corpus():
    cfg = composed()
    assert (cfg.model.name, cfg.residual["name"], cfg.residual["n"], cfg.data.source) == ("small", "mhc", 4, "bundled")


@pytest.mark.compat
def test_a_typo_in_an_override_is_an_error():
    with pytest.raises(Exception, match="d_modl"):
        composed("model.d_modl=64")
    with pytest.raises(Exception, match="sinkhorn_iter"):
        composed("residual.sinkhorn_iter=3")


def with_changes(cfg: TrainConfig, section: str, **changes) -> TrainConfig:
    if section == "residual":
        return dataclasses.replace(cfg, residual={**cfg.residual, **changes})
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


@pytest.mark.parametrize("section,changes,message", [
    ("residual", {"n": 0}, "residual.n=0: the number of streams must be an integer >= 1"),
    ("residual", {"sinkhorn_iters": 0}, "residual.sinkhorn_iters=0: allowed: an integer >= 1"),
    ("residual", {"name": "mhx"}, "residual.name='mhx': allowed: hc, ihc, kromhc, mhc, mhc_lite, orthogonal, orthostochastic, residual, rtbp, shc, tbp"),
    ("residual", {"collapse": "max"}, "residual.collapse='max': allowed: head, sum, mean"),
    ("residual", {"sinkhorn_iter": 2}, "residual.sinkhorn_iter=2: not an option of residual=mhc"),
    ("residual", {"kernel": "cuda"}, "residual.kernel='cuda': unknown kernel choice; allowed: auto, triton, torch"),
    ("residual", {"kernel": "triton", "n": 16}, "residual.kernel='triton': the kernels take up to 8 streams, not "
                                                "residual.n=16; allowed: auto, torch"),
    ("model", {"n_heads": 3}, "model.n_heads=3: model.d_model=128 must be divisible by it"),
    ("model", {"n_kv_heads": 3}, "model.n_kv_heads=3: allowed: a divisor of model.n_heads=4"),
    ("data", {"seq_len": 4096}, "data.seq_len=4096: longer than the model's context model.max_seq_len=1024"),
    ("data", {"source": "local", "files": ["/nonexistent/*.txt"]}, "data.files='/nonexistent/*.txt': no such file"),
    ("data", {"source": "local", "files": []}, "data.files=[]: data=local needs at least one file"),
    ("data", {"source": "stream"}, "data.source='stream': allowed: bundled, local, hub, shards"),
    ("data", {"source": "hub"}, "data.path=None: data=hub needs a dataset"),
    ("data", {"source": "hub", "path": "/nonexistent/dir"}, "data.path='/nonexistent/dir': no such directory"),
    ("data", {"source": "hub", "path": "json"}, "data.data_files=[]: data.path=json reads the files named here"),
    ("data", {"source": "hub", "path": "org/name", "data_files": ["/nonexistent/*.jsonl"]},
     "data.data_files='/nonexistent/*.jsonl': no such file"),
    ("data", {"source": "hub", "path": "org/name", "val_docs": 0}, "data.val_docs=0: allowed: a number >= 1"),
    ("data", {"source": "hub", "path": "org/name", "shuffle_buffer": -1}, "data.shuffle_buffer=-1: allowed"),
    ("data", {"source": "shards"}, "data.dir=None: data=shards needs the directory written by python -m mhc_lm.data"),
    ("data", {"source": "shards", "dir": "/nonexistent"}, "data.dir='/nonexistent': no such directory"),
    ("optim", {"schedule": "linear"}, "optim.schedule='linear': allowed: cosine, wsd, constant"),
    ("optim", {"lr": 0.0}, "optim.lr=0.0: allowed: a number > 0"),
    ("trainer", {"grad_accum": 0}, "trainer.grad_accum=0: allowed: a number >= 1"),
    ("trainer", {"resume": "/nonexistent/run"}, "trainer.resume='/nonexistent/run': no such path"),
    ("trainer", {"precision": "fp8"}, "trainer.precision='fp8': allowed: auto, bf16, fp16, fp32"),
])
def test_bad_values_name_option_value_and_what_is_allowed(section, changes, message):
    cfg = with_changes(composed(), section, **changes)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_incompatible_checkpoint_is_refused(tmp_path):
    cfg = composed()
    saved = {"model": dataclasses.asdict(cfg.model), "residual": cfg.residual}
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    check_compatible(tmp_path, saved)  # the same config is fine
    check_compatible(tmp_path, {**saved, "model": {**saved["model"], "name": "renamed"}})  # a name is not architecture
    check_compatible(tmp_path, {**saved, "residual": {**saved["residual"], "kernel": "torch"}})  # nor the kernels
    changed = {**saved, "model": {**saved["model"], "d_model": 256}}
    with pytest.raises(ConfigError, match=r"model.d_model=256: the checkpoint .* was trained with model.d_model=128"):
        check_compatible(tmp_path, changed)
    other_residual = {**saved, "residual": {**saved["residual"], "n": 2}}
    with pytest.raises(ConfigError, match="residual.n=2"):
        check_compatible(tmp_path, other_residual)


def test_a_shard_directory_must_hold_a_complete_manifest(tmp_path):
    base = composed("data=shards", f"data.dir={minimal_shard_dir(tmp_path / 'ok')}")
    validate(base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no manifest.json; allowed: a directory written by python -m mhc_lm"):
        validate(with_changes(base, "data", dir=str(tmp_path / "empty")))
    broken = minimal_shard_dir(tmp_path / "broken")
    (broken / "train-00000.bin").write_bytes(bytes(4))  # 2 tokens, the manifest says 10
    with pytest.raises(ConfigError, match="shard train-00000.bin is missing or not 10 tokens long"):
        validate(with_changes(base, "data", dir=str(broken)))
    newer = minimal_shard_dir(tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ConfigError, match="version 99; allowed: mhc-lm-token-shards version <= 1"):
        validate(with_changes(base, "data", dir=str(newer)))


def test_forced_triton_needs_triton_and_a_gpu_or_the_interpreter(monkeypatch):
    """residual.kernel=triton is refused before any work where it could not run; auto and torch always run."""
    import torch

    import mhc_lm.kernels as kernels

    cfg = with_changes(composed(), "residual", kernel="triton")
    monkeypatch.setattr(kernels, "_TRITON_AVAILABLE", False)
    with pytest.raises(ConfigError, match=r"^residual.kernel='triton': triton is not installed \(pip install -e "
                                          r"'.\[kernels\]'\); allowed: auto, torch$"):
        validate(cfg)
    monkeypatch.setattr(kernels, "_TRITON_AVAILABLE", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"^residual.kernel='triton': no CUDA device, and the Triton interpreter "
                                          r"is off .*; allowed: auto, torch$"):
        validate(cfg)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    validate(cfg)  # the interpreter runs the kernels on CPU
    for kernel in ("auto", "torch"):
        monkeypatch.setattr(kernels, "_TRITON_AVAILABLE", False)
        validate(with_changes(composed(), "residual", kernel=kernel))
