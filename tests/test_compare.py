"""The sweep report (mhc_lm.compare) on fake run directories whose metrics are known numbers."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from mhc_lm.compare import compare, find_runs, main, read_run, summarize
from mhc_lm.errors import ConfigError

# (variant, seed) -> (final val loss, tokens/s at the logged steps after the first, final composite fwd gain)
RUNS = {
    ("residual", 0): (4.00, [1000.0, 1100.0, 1200.0], 1.0),
    ("residual", 1): (4.20, [900.0, 1000.0, 1100.0], 1.0),
    ("hc", 0): (3.90, [500.0, 600.0, 700.0], 3000.0),
    ("hc", 1): (3.95, [600.0, 700.0, 800.0], 1000.0),
    ("hc", 2): (3.85, [400.0, 500.0, 600.0], 2000.0),
    ("mhc", 0): (4.10, [250.0, 300.0, 350.0], 1.5),
}


def fake_run(root: Path, variant: str, seed: int, val_loss: float, speeds: list[float], gain: float,
             eval_batches: int = 8, activation: float | None = None) -> Path:
    """A run directory as train.py leaves it: .hydra/config.yaml and metrics.jsonl (4 logged steps, 100
    tokens each; validation at 2 and 4; probes at 2 and 4, the peak gain at step 2)."""
    run = root / f"{variant}-s{seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {"residual": {"name": variant, "n": 4}, "trainer": {"seed": seed, "eval_batches": eval_batches,
                                                                  "batch_size": 16}, "data": {"seq_len": 128}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"step": 1, "train/tokens_per_s": 1.0, "train/tokens_seen": 100}]  # warm-up: left out
    for step, speed in zip((2, 3, 4), speeds):
        records.append({"step": step, "train/tokens_per_s": speed, "train/tokens_seen": 100 * step})
    records.insert(2, {"step": 2, "val/loss": val_loss + 1.0})
    records.insert(3, {"step": 2, "diag/summary/comp_gain_fwd_max": 2 * gain, "diag/summary/comp_gain_bwd_max": 7.0})
    records += [{"step": 4, "val/loss": val_loss}, {"step": 4, "diag/summary/comp_gain_fwd_max": gain,
                                                    "diag/summary/comp_gain_bwd_max": gain / 2,
                                                    "diag/summary/comp_spectral_norm_max": 1.0 + seed},
                {"step": 4, "final/val_loss": val_loss}]
    if activation is not None:
        records.append({"step": 4, "memory/activation_bytes": activation})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "checkpoints" / "step_000004").mkdir(parents=True)  # never taken for a run
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweeps" / "test"
    for (variant, seed), (loss, speeds, gain) in RUNS.items():
        fake_run(root, variant, seed, loss, speeds, gain)
    return root


def test_a_run_reads_its_final_loss_median_speed_gains_and_curve(sweep):
    run = read_run(sweep / "hc-s1")
    assert (run.variant, run.seed, run.val_tokens) == ("hc", 1, 8 * 16 * 128)
    assert run.val_loss == 3.95
    assert run.tokens_per_s == 700.0  # median of 600, 700, 800: the warm-up step (1.0) is left out
    assert (run.comp_gain_fwd, run.comp_gain_bwd, run.comp_gain_fwd_peak) == (1000.0, 500.0, 2000.0)
    assert run.comp_spectral_norm == 2.0
    assert run.curve == [(200.0, 4.95), (400.0, 3.95)]
    assert math.isnan(run.activation_bytes)


def test_variants_get_mean_and_sample_spread_over_seeds(sweep):
    rows = {r["residual"]: r for r in summarize(find_runs([sweep]))}
    assert list(rows) == ["residual", "hc", "mhc"]  # the baseline first
    hc = rows["hc"]
    assert hc["runs"] == 3 and hc["seeds"] == "0 1 2"
    assert hc["val_loss_mean"] == pytest.approx(3.90)
    assert hc["val_loss_std"] == pytest.approx(statistics.stdev([3.90, 3.95, 3.85]))  # 0.05
    assert hc["tokens_per_s_mean"] == pytest.approx(600.0) and hc["tokens_per_s_std"] == pytest.approx(100.0)
    assert hc["comp_gain_fwd_mean"] == pytest.approx(2000.0) and hc["comp_gain_fwd_peak_mean"] == pytest.approx(4000)
    base = rows["residual"]
    assert base["val_loss_mean"] == pytest.approx(4.10) and base["val_loss_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert base["tokens_per_s_mean"] == pytest.approx(1050.0)
    assert hc["tokens_per_s_vs_residual"] == pytest.approx(600 / 1050)
    assert rows["mhc"]["tokens_per_s_vs_residual"] == pytest.approx(300 / 1050)
    assert math.isnan(rows["mhc"]["val_loss_std"])  # one seed: no spread
    assert math.isnan(hc["activation_bytes_vs_residual"])  # not recorded: n/a


def test_activation_bytes_relative_to_the_residual_when_recorded(tmp_path):
    fake_run(tmp_path, "residual", 0, 4.0, [1.0, 1.0, 1.0], 1.0, activation=1000.0)
    fake_run(tmp_path, "mhc", 0, 4.0, [1.0, 1.0, 1.0], 1.0, activation=2500.0)
    rows = {r["residual"]: r for r in summarize(find_runs([tmp_path]))}
    assert rows["mhc"]["activation_bytes_vs_residual"] == pytest.approx(2.5)


def test_the_report_files_hold_the_same_numbers(sweep, tmp_path):
    rows, files = compare([sweep], tmp_path / "out")
    assert set(files) == {"summary.md", "summary.csv", "runs.md", "runs.csv", "loss_vs_tokens.png", "gains_vs_step.png"}
    table = {r["residual"]: r for r in csv.DictReader(open(files["summary.csv"]))}
    assert float(table["hc"]["val_loss_mean"]) == pytest.approx(3.90)
    markdown = files["summary.md"].read_text()
    assert "| hc | 3 (0 1 2) | 3.9000 ± 0.0500 | 600 ± 100 | 0.57x | n/a | 2,000 ± 1,000 |" in markdown
    assert markdown.splitlines()[3].endswith("| 2.0000 ± 1.0000 |")  # hc: spectral norms 1, 2, 3
    assert "first 16,384 validation tokens" in markdown
    runs = list(csv.DictReader(open(files["runs.csv"])))
    assert [r["run"] for r in runs] == sorted(f"{v}-s{s}" for v, s in RUNS)
    assert all(files[p].read_bytes()[:4] == b"\x89PNG" for p in ("loss_vs_tokens.png", "gains_vs_step.png"))


def unfinish(run: Path, last_step: int = 2) -> None:
    """Cut a fake run's metrics after `last_step`, as a run still training (no final/val_loss) leaves them."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["step"] <= last_step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def test_unfinished_runs_are_left_out_and_named(sweep, tmp_path, capsys):
    unfinish(sweep / "hc-s2")  # its val loss is step 2's (4.85): mixed in it would move hc's mean
    rows, files = compare([sweep], tmp_path / "out")
    hc = next(r for r in rows if r["residual"] == "hc")
    assert hc["runs"] == 2 and hc["val_loss_mean"] == pytest.approx(3.925)
    assert "Left out, not finished: hc-s2 (step 2)." in files["summary.md"].read_text()
    listed = {r["run"]: r for r in csv.DictReader(open(files["runs.csv"]))}
    assert listed["hc-s2"]["finished"] == "False" and listed["hc-s2"]["last_step"] == "2"
    assert listed["hc-s0"]["finished"] == "True" and listed["hc-s0"]["last_step"] == "4"
    rows, _ = compare([sweep], tmp_path / "all", unfinished=True)
    hc = next(r for r in rows if r["residual"] == "hc")
    assert hc["runs"] == 3 and hc["val_loss_mean"] == pytest.approx((3.90 + 3.95 + 4.85) / 3)
    for run in sweep.iterdir():
        if run.is_dir() and run.name != "compare":
            unfinish(run, 3)
    assert main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run has finished yet" in err and "hc-s0 (step 3)" in err and "--unfinished" in err


def test_runs_on_different_validation_budgets_are_refused(tmp_path):
    fake_run(tmp_path, "residual", 0, 4.0, [1.0, 1.0, 1.0], 1.0, eval_batches=8)
    fake_run(tmp_path, "mhc", 0, 4.0, [1.0, 1.0, 1.0], 1.0, eval_batches=2)
    with pytest.raises(ConfigError, match="different token budgets"):
        compare([tmp_path], tmp_path / "out")


def test_the_command_line_writes_beside_the_sweep_and_refuses_an_empty_folder(sweep, tmp_path, capsys):
    assert main([str(sweep)]) == 0
    assert (sweep / "compare" / "summary.md").exists() and "6 runs, 3 variants" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no run in it" in capsys.readouterr().err


def test_a_diagnostics_report_of_another_format_version_is_refused_in_one_line(tmp_path):
    from mhc_lm.compare import last_report
    from mhc_lm.run_dir import REPORT_FORMAT, REPORT_VERSION, RunDir

    run = RunDir(tmp_path / "mhc-s0")
    folder = run.diagnostics_at(4)
    folder.mkdir(parents=True)
    (folder / "diagnostics.json").write_text(json.dumps({"format": REPORT_FORMAT, "version": REPORT_VERSION, "step": 4}))
    assert last_report(run.path)["step"] == 4
    (folder / "diagnostics.json").write_text(json.dumps({"format": REPORT_FORMAT, "version": REPORT_VERSION + 1}))
    with pytest.raises(ConfigError, match=r"step_000004/diagnostics.json: a diagnostics report of format "
                                          r"'mhc-lm-diagnostics' version 2; allowed: 'mhc-lm-diagnostics' version 1"):
        last_report(run.path)


def test_kept_records_rebuild_the_same_report_without_the_checkpoints(sweep, tmp_path):
    from mhc_lm.run_dir import REPORT_FORMAT, REPORT_VERSION, RunDir

    for step in (2, 4):  # probe reports at 2 and 4: only the newest is kept
        folder = RunDir(sweep / "mhc-s0").diagnostics_at(step)
        folder.mkdir(parents=True)
        sublayers = [{"h_res_mean": [[1.0 - step / 8, step / 8], [step / 8, 1.0 - step / 8]]}] * 2
        (folder / "diagnostics.json").write_text(json.dumps({"format": REPORT_FORMAT, "version": REPORT_VERSION,
                                                              "step": step, "n": 2, "sublayers": sublayers}))
        (folder / "spectra.png").write_bytes(b"\x89PNG")
    with open(sweep / "mhc-s0" / "metrics.jsonl", "a") as f:  # a metric the report does not read
        f.write(json.dumps({"step": 4, "grad_norm/global": 1.5, "train/loss": 4.2}) + "\n")
    unfinish(sweep / "hc-s2")
    kept = tmp_path / "kept"
    _, first = compare([sweep], tmp_path / "out", keep=kept)
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"{v}-s{s}" for v, s in RUNS)
    _, files = compare([kept], tmp_path / "again")
    assert "h_res_heatmaps.png" in files
    for name in ("summary.md", "summary.csv", "runs.md"):  # the same tables, n/a and the unfinished hc-s2 included
        assert files[name].read_text() == first[name].read_text()
    for name in ("mhc-s0", "hc-s1", "hc-s2"):
        a, b = read_run(kept / name), read_run(sweep / name)
        assert (a.row(), a.curve, a.gains) == (b.row(), b.curve, b.gains)
    mhc = kept / "mhc-s0"
    files = sorted(str(p.relative_to(mhc)) for p in mhc.rglob("*") if p.is_file())
    assert files == [".hydra/config.yaml", "diagnostics/step_000004/diagnostics.json", "metrics.jsonl"]
    assert "grad_norm" not in (mhc / "metrics.jsonl").read_text()
    # keeping again replaces the copy; a run compared from its kept folder is not copied onto itself
    compare([sweep], tmp_path / "out", keep=kept)
    compare([kept], tmp_path / "again", keep=kept)
    assert (mhc / "metrics.jsonl").exists() and not list(kept.glob(".tmp-*"))
