"""What a user can name as a model: each kind resolves from the file system and answers for itself."""

from __future__ import annotations

import json

import pytest

from mhc_lm.checkpoint import write_manifest
from mhc_lm.errors import ConfigError
from mhc_lm.model_sources import CheckpointSource, ExportSource, HubSource, resolve_sources


def fake_run(root):
    """A run with two checkpoints and an export, as files only (nothing here loads a model)."""
    for step in (2, 10):
        ckpt = root / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "tokens_seen": 64 * step}))
        (ckpt / "run_config.json").write_text(json.dumps({"model": {"max_seq_len": 32}, "residual": {}}))
        (ckpt / "config.json").write_text(json.dumps({"max_position_embeddings": 32}))
        (ckpt / "model.safetensors").write_bytes(b"")
        write_manifest(ckpt)
    export = root / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"max_position_embeddings": 48}))
    (export / "trainer_state.json").write_text(json.dumps({"step": 10, "tokens_seen": 640}))
    (root / "metrics.jsonl").write_text("{}\n")
    return root


def test_each_kind_resolves_with_its_run_step_and_label(tmp_path):
    run = fake_run(tmp_path / "tiny-mhc")
    (last,) = resolve_sources(str(run))
    assert type(last) is ExportSource and (last.label, last.step, last.run_dir) == ("tiny-mhc/export", 10, run)
    every = resolve_sources(str(run), checkpoints="all")
    assert [type(s) for s in every] == [CheckpointSource] * 2
    assert [(s.label, s.step, s.tokens_seen) for s in every] == [("tiny-mhc/step_000002", 2, 128),
                                                               ("tiny-mhc/step_000010", 10, 640)]
    (hub,) = resolve_sources("someone/model")
    assert type(hub) is HubSource and hub.location == "someone/model"


def test_context_and_report_folder_come_from_the_kind(tmp_path):
    run = fake_run(tmp_path / "run")
    (export,) = resolve_sources(str(run / "export"))
    (ckpt,) = resolve_sources(str(run / "checkpoints" / "step_000002"))
    (hub,) = resolve_sources("someone/model")
    assert (export.context(), ckpt.context(), hub.context()) == (48, 32, None)
    assert export.diagnostics_dir() == run / "diagnostics" / "export"  # not inside the export that gets pushed
    assert ckpt.diagnostics_dir() == run / "diagnostics" / "checkpoint_step_000002"
    assert hub.diagnostics_dir().as_posix() == "diagnostics/someone--model"


def test_an_export_without_its_modeling_code_cannot_be_published(tmp_path):
    (export,) = resolve_sources(str(fake_run(tmp_path / "run") / "export"))
    with pytest.raises(ConfigError, match=r"an export without its modeling code .* allowed: an export of mhc-lm"):
        export.export_folder(tmp_path / "scratch")
