"""A sweep in one command, and the loose ends a user meets on the way: train.log, refused commands
leaving nothing behind, eval.py's help, where the diagnostics command writes, an unreachable Hub."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_RUN, run_cli


@pytest.fixture(scope="module")
def sweep(cache_dir, tmp_path_factory):
    """Two tiny runs (residual and mhc, seed 3) of one multirun, 2 steps each."""
    root = tmp_path_factory.mktemp("sweep")
    result = run_cli("train.py", "-m", *TINY_RUN, f"trainer.output_dir={root}", f"data.cache_dir={cache_dir}",
                     "residual=residual,mhc", "trainer.seed=3", "trainer.max_steps=2", "trainer.eval_every=2",
                     "trainer.num_threads=1", "hydra.sweep.dir=" + str(root / "sweeps" / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sweeps" / "two", result


@pytest.mark.slow
def test_a_multirun_lands_runs_named_by_variant_and_seed_under_one_sweep_dir(sweep):
    sweep_dir, _ = sweep
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert runs == ["mhc-s3", "residual-s3"]
    for name, variant in (("mhc-s3", "mhc"), ("residual-s3", "residual")):
        records = [json.loads(line) for line in (sweep_dir / name / "metrics.jsonl").read_text().splitlines()]
        assert any("final/val_loss" in r for r in records)
        assert f"residual: {variant}" in (sweep_dir / name / ".hydra" / "overrides.yaml").read_text() or \
            f"residual={variant}" in (sweep_dir / name / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_the_sweep_compares_in_one_command(sweep):
    from mhc_lm.compare import main

    sweep_dir, _ = sweep
    assert main([str(sweep_dir)]) == 0
    summary = (sweep_dir / "compare" / "summary.md").read_text()
    assert "| residual | 1 (3) |" in summary and "| mhc | 1 (3) |" in summary


@pytest.mark.slow
def test_train_log_holds_the_run_log(sweep):
    sweep_dir, result = sweep
    log = (sweep_dir / "mhc-s3" / "train.log").read_text()
    assert "residual=mhc n=4" in log and "final val loss" in log and "step 2: val loss" in log
    assert "\r" not in log and "Training:" not in log  # no progress-bar redraws
    final = [line for line in result.stdout.splitlines() if "final val loss" in line and "mhc-s3" in line]
    assert final and final[0] in log


@pytest.mark.slow
def test_a_config_error_found_inside_the_run_leaves_no_run_directory(train_cli, tmp_path):
    result = train_cli("model.vocab_size=100", "trainer.run_name=refused")  # known only once the tokenizer is
    assert result.returncode == 2 and "model.vocab_size=100" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.vocab_size=100: smaller than")  # after
    # the tokenizer's progress bars, one line, no traceback
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "refused").exists()


@pytest.mark.slow
def test_an_eval_refused_after_hydra_started_leaves_no_eval_directory(tiny_run, tmp_path):
    result = run_cli("eval.py", f"models=[{tiny_run}]", "lm_eval.tasks=[no_such_task]",
                     f"output_dir={tmp_path / 'evals'}", "run_name=refused")
    assert result.returncode == 2 and "unknown task(s) no_such_task" in result.stderr
    assert not (tmp_path / "evals" / "refused").exists()


def test_a_resumed_run_is_kept_when_refused(tmp_path):
    from mhc_lm.cli import remove_if_only_hydra

    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    for run in (fresh, resumed):
        (run / ".hydra").mkdir(parents=True)
        (run / "train.log").write_text("")
    (resumed / "checkpoints").mkdir()
    assert remove_if_only_hydra(fresh) and not fresh.exists()
    assert not remove_if_only_hydra(resumed) and (resumed / "checkpoints").exists()


def test_eval_help_lists_only_the_groups_eval_accepts():
    result = run_cli("eval.py", "--help")
    assert result.returncode == 0
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = [line.split(":")[0] for line in groups.splitlines() if ":" in line and "group=option" not in line]
    assert listed == ["data"] and "bundled, hub, local, shards" in groups
    assert "models: ???" in result.stdout


def test_eval_without_models_is_one_line_and_exit_2(tmp_path):
    result = run_cli("eval.py", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: models=???: has no value; allowed: set it on the command line (models=...)"
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_diagnostics_command_on_a_run_writes_under_its_diagnostics_not_its_export(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = subprocess.run([sys.executable, "-m", "mhc_lm.diagnostics", str(run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "diagnostics" / "export" / "diagnostics.json").exists()
    assert not (run / "export" / "diagnostics").exists()


def test_the_report_dirs_of_a_checkpoint_an_export_and_a_hub_id(tmp_path):
    from mhc_lm.model_sources import CheckpointSource, ExportSource, HubSource

    run = tmp_path / "run"
    checkpoint = CheckpointSource(str(run / "checkpoints" / "step_000008"), "run/step_000008", run, 8)
    assert checkpoint.diagnostics_dir() == run / "diagnostics" / "checkpoint_step_000008"
    assert ExportSource(str(run / "export"), "run/export", run).diagnostics_dir() == run / "diagnostics" / "export"
    alone = tmp_path / "alone"  # a model folder of no run: its report beside it
    assert ExportSource(str(alone), str(alone)).diagnostics_dir() == alone / "diagnostics"
    assert str(HubSource("alice/m", "alice/m").diagnostics_dir()) == "diagnostics/alice--m"


def test_pushing_while_the_hub_is_unreachable_is_one_line_and_exit_2(tiny_run):
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9: connection refused
    result = subprocess.run([sys.executable, "-m", "mhc_lm.hub", "push", str(tiny_run), "--repo", "alice/x"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --repo='alice/x': the Hub at http://127.0.0.1:9 is unreachable")
    assert len(result.stderr.strip().splitlines()) == 1


def has_submitit_launcher() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


@pytest.mark.skipif(not has_submitit_launcher(), reason="the [slurm] extra (hydra-submitit-launcher) is not installed")
def test_the_slurm_launcher_config_composes_with_our_defaults():
    result = run_cli("train.py", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                     "-p", "hydra.launcher")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SlurmLauncher" in result.stdout and "partition: gpu" in result.stdout
    assert "tasks_per_node: 1" in result.stdout and "max_num_timeout: 3" in result.stdout
