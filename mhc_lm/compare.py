"""One report over a sweep: each residual variant's final loss, speed, memory and stability, over seeds.

    python -m mhc_lm.compare runs/sweeps/<sweep>            # -> runs/sweeps/<sweep>/compare/
    python -m mhc_lm.compare runs/a runs/b --out cmp/       # any runs (or folders of runs)

Reads only what train.py wrote in each run directory: `.hydra/config.yaml` (variant, seed, the validation
budget) and `metrics.jsonl`. Per run (`runs.md`, `runs.csv`):

- `val_loss`: the last validation loss train.py logged (`final/val_loss`, else the last `val/loss`), on
  the first `val_tokens` = trainer.eval_batches x trainer.batch_size x data.seq_len tokens of the
  validation split (per process). eval.py's loss (`max_tokens`, 65,536 by default) is another budget and
  is never mixed in;
- `tokens_per_s`: the median of the logged `train/tokens_per_s`, the first logged step (warm-up) left out;
- `activation_bytes`: the last metric whose name holds `activation` and ends in `bytes`, when the run
  recorded one (else n/a);
- `comp_gain_fwd` / `comp_gain_bwd`: the last `diag/summary/comp_gain_{fwd,bwd}_max` (the worst sublayer's
  token-max composite Amax gain H_res[L-1]...H_res[l], `mhc_lm.diagnostics`); `comp_gain_fwd_peak`: its
  largest value over training; `comp_spectral_norm`: the last `diag/summary/comp_spectral_norm_max` (the
  composite's largest singular value: for sHC and orthogonal, whose H_res has negative entries, the
  bound that matters where the Amax gain overstates it).

Only finished runs (those that logged `final/val_loss`) are compared: one still training, or stopped early,
has an earlier step's loss; `summary.md` names the ones left out, `runs.md` lists every run with its last
step, and `--unfinished` compares them too.

Per variant (`summary.md`, `summary.csv`): the mean and the sample standard deviation over its runs
(seeds) of each, tokens/s and activation bytes also relative to the `residual` variant's mean. Plots:
validation loss against tokens seen (mean over seeds, band: min to max), the composite gains against
step (log scale when they grow), and the last probe's H_res of every sublayer, variants side by side
(`loss_vs_tokens.png`, `gains_vs_step.png`, `h_res_heatmaps.png`).

`--keep DIR` copies what the report reads of each run (its config, the metrics above, the newest probe
report) into DIR/<run>: a folder the report rebuilds from alone, after the checkpoints are gone
(RESULTS.md's runs are kept in results/runs/).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import ConfigError
from .run_dir import PARTIAL_PREFIX, REPORT_FORMAT, REPORT_VERSION, RunDir, step_of
from .tables import markdown_table, write_csv

BASELINE = "residual"
GAIN_KEYS = {"fwd": "diag/summary/comp_gain_fwd_max", "bwd": "diag/summary/comp_gain_bwd_max"}
SPECTRAL_KEY = "diag/summary/comp_spectral_norm_max"
RUN_COLUMNS = ("val_loss", "tokens_per_s", "activation_bytes", "comp_gain_fwd", "comp_gain_bwd",
               "comp_gain_fwd_peak", "comp_spectral_norm")


@dataclass
class RunRecord:
    """What one run's directory says about it."""

    name: str
    path: Path
    variant: str
    seed: Optional[int]
    val_tokens: Optional[int]  # the validation budget of val_loss and the curve
    val_loss: float = math.nan
    tokens_per_s: float = math.nan
    activation_bytes: float = math.nan
    comp_gain_fwd: float = math.nan
    comp_gain_bwd: float = math.nan
    comp_gain_fwd_peak: float = math.nan
    comp_spectral_norm: float = math.nan
    finished: bool = False  # logged final/val_loss: the run reached trainer.max_steps
    last_step: int = 0
    curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens seen, validation loss)
    gains: list[tuple[int, float, float]] = field(default_factory=list)  # (step, composite fwd, bwd)

    @property
    def where(self) -> str:
        """`name (step N)`: how far the run got, for the messages about unfinished runs."""
        return f"{self.name} (step {self.last_step})"

    def row(self) -> dict:
        return {"run": self.name, "residual": self.variant, "seed": self.seed, "val_tokens": self.val_tokens,
                "finished": self.finished, "last_step": self.last_step, **{k: getattr(self, k) for k in RUN_COLUMNS}}


# ---------------------------------------------------------------------------------------------
# Reading runs


def run_config(run_dir: Path) -> dict:
    """The run's saved Hydra config as a plain dict ({} when absent)."""
    from omegaconf import OmegaConf

    path = RunDir(run_dir).hydra_config
    if not path.exists():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def run_identity(run_dir: Path) -> tuple[str, Optional[int], Optional[int]]:
    """(residual variant, seed, validation tokens per process) from RUN/.hydra/config.yaml; the variant
    is `?` and the others None without it."""
    cfg = run_config(run_dir)
    residual, trainer, data = cfg.get("residual", {}), cfg.get("trainer", {}), cfg.get("data", {})
    try:
        val_tokens = int(trainer["eval_batches"]) * int(trainer["batch_size"]) * int(data["seq_len"])
    except (KeyError, TypeError, ValueError):
        val_tokens = None
    seed = trainer.get("seed")
    return str(residual.get("name", "?")), (int(seed) if isinstance(seed, int) else None), val_tokens


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: Path, name: Optional[str] = None) -> RunRecord:
    variant, seed, val_tokens = run_identity(run_dir)
    record = RunRecord(name or run_dir.name, run_dir, variant, seed, val_tokens)
    records = read_metrics(RunDir(run_dir).metrics)
    tokens_at, val, speeds, gains = {0: 0}, [], [], {}
    for m in records:
        step = m["step"]
        record.last_step = max(record.last_step, step)
        if "train/tokens_seen" in m:
            tokens_at[step] = m["train/tokens_seen"]
        if "train/tokens_per_s" in m:
            speeds.append(m["train/tokens_per_s"])
        if "val/loss" in m:
            val.append((step, m["val/loss"]))
        if "final/val_loss" in m:
            record.val_loss, record.finished = m["final/val_loss"], True
        if GAIN_KEYS["fwd"] in m:
            gains[step] = (m[GAIN_KEYS["fwd"]], m.get(GAIN_KEYS["bwd"], math.nan))
        if SPECTRAL_KEY in m:
            record.comp_spectral_norm = m[SPECTRAL_KEY]
        for key, value in m.items():
            if "activation" in key and key.endswith("bytes") and isinstance(value, (int, float)):
                record.activation_bytes = float(value)
    if math.isnan(record.val_loss) and val:
        record.val_loss = val[-1][1]
    speeds = speeds[1:] if len(speeds) > 1 else speeds  # the first logged step carries the warm-up
    record.tokens_per_s = statistics.median(speeds) if speeds else math.nan
    record.curve = [(tokens_at_step(tokens_at, step), loss) for step, loss in val]
    record.gains = [(step, fwd, bwd) for step, (fwd, bwd) in sorted(gains.items())]
    if record.gains:
        record.comp_gain_fwd, record.comp_gain_bwd = record.gains[-1][1], record.gains[-1][2]
        record.comp_gain_fwd_peak = max(g[1] for g in record.gains)
    return record


def read_key(key: str) -> bool:
    """Whether read_run uses metric `key`: what --keep copies of a run's metrics.jsonl."""
    return (key in ("train/tokens_seen", "train/tokens_per_s", "val/loss", "final/val_loss")
            or key in (*GAIN_KEYS.values(), SPECTRAL_KEY) or ("activation" in key and key.endswith("bytes")))


def keep_run(run: RunRecord, into: Path) -> Path:
    """Copy what the report reads of `run` (the Hydra config, the metrics read_run uses, the newest probe
    report) into `into`/<run name>, replacing an earlier copy; the copy reads back as the same record."""
    source, target = RunDir(run.path), RunDir(into / run.name)
    tmp = target.path.with_name(PARTIAL_PREFIX + target.path.name)
    shutil.rmtree(tmp, ignore_errors=True)
    kept = RunDir(tmp)
    kept.hydra_config.parent.mkdir(parents=True)
    shutil.copy2(source.hydra_config, kept.hydra_config)
    rows = []
    for m in read_metrics(source.metrics):
        row = {k: v for k, v in m.items() if k == "step" or read_key(k)}
        if len(row) > 1:
            rows.append(row)
    kept.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reports = [d for d in source.list_diagnostics() if (d / "diagnostics.json").exists()]
    if reports:
        report_dir = kept.diagnostics_at(step_of(reports[-1]))
        report_dir.mkdir(parents=True)
        shutil.copy2(reports[-1] / "diagnostics.json", report_dir / "diagnostics.json")
    shutil.rmtree(target.path, ignore_errors=True)
    tmp.rename(target.path)
    return target.path


def tokens_at_step(known: dict[int, int], step: int) -> float:
    """Tokens seen at `step`: logged there, else interpolated between the nearest logged steps."""
    import numpy as np

    steps = sorted(known)
    return float(np.interp(step, steps, [known[s] for s in steps]))


def find_runs(paths: list[Path]) -> list[RunRecord]:
    """Every run (a directory with metrics.jsonl) at or under `paths`, named by its path below the folder
    given (mhc-s0, or sweep/mhc-s0 when several sweeps are under it); ConfigError if there is none."""
    runs = []
    for root in paths:
        if not root.is_dir():
            raise ConfigError(f"SWEEP_DIR={str(root)!r}: no such directory; allowed: a sweep directory "
                              "(runs/sweeps/<name>), a run directory or a folder of runs")
        metrics = RunDir(root).metrics.name
        found = [root / metrics] if (root / metrics).exists() else sorted(root.glob(f"**/{metrics}"))
        found = [p for p in found if RunDir(root).checkpoints.name not in p.relative_to(root).parts
                 and not any(part.startswith(PARTIAL_PREFIX) for part in p.relative_to(root).parts)]
        if not found:
            raise ConfigError(f"SWEEP_DIR={str(root)!r}: no run in it (no metrics.jsonl); allowed: a directory "
                              "train.py wrote runs into")
        for path in found:
            run_dir = path.parent
            name = run_dir.name if run_dir == root else str(run_dir.relative_to(root))
            runs.append(read_run(run_dir, name))
    return runs


# ---------------------------------------------------------------------------------------------
# Over seeds


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the finite values; spread NaN with fewer than two."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else math.nan)


def by_variant(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by residual variant, the baseline first, then in name order."""
    groups: dict[str, list[RunRecord]] = {}
    for run in sorted(runs, key=lambda r: (r.variant != BASELINE, r.variant, r.seed if r.seed is not None else -1)):
        groups.setdefault(run.variant, []).append(run)
    return groups


def summarize(runs: list[RunRecord]) -> list[dict]:
    """One row per variant: mean and spread over its runs, speed and memory relative to the residual."""
    groups = by_variant(runs)
    rows = []
    for variant, members in groups.items():
        row = {"residual": variant, "runs": len(members),
               "seeds": " ".join(str(r.seed) for r in members if r.seed is not None)}
        for key in RUN_COLUMNS:
            mean, spread = mean_and_spread([getattr(r, key) for r in members])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, spread
        rows.append(row)
    base = next((r for r in rows if r["residual"] == BASELINE), None)
    for row in rows:
        for key in ("tokens_per_s", "activation_bytes"):
            denominator = base[f"{key}_mean"] if base is not None else math.nan
            row[f"{key}_vs_residual"] = row[f"{key}_mean"] / denominator if denominator else math.nan
    return rows


def check_one_budget(runs: list[RunRecord]) -> Optional[int]:
    """The one validation budget of these runs; ConfigError when they differ (their losses don't compare)."""
    budgets = {r.val_tokens for r in runs}
    if len(budgets) > 1:
        listed = ", ".join(f"{r.name}: {r.val_tokens}" for r in runs)
        raise ConfigError(f"SWEEP_DIR: the runs' validation losses are on different token budgets ({listed}); "
                          "allowed: runs with the same trainer.eval_batches x trainer.batch_size x data.seq_len")
    return budgets.pop() if budgets else None


# ---------------------------------------------------------------------------------------------
# Tables and plots


COLUMN_NAMES = {"val_loss": "val loss", "tokens_per_s": "tokens/s", "activation_bytes": "activation bytes",
                "comp_gain_fwd": "composite gain fwd", "comp_gain_bwd": "composite gain bwd",
                "comp_gain_fwd_peak": "peak composite gain fwd", "comp_spectral_norm": "composite spectral norm"}


def summary_markdown(rows: list[dict], val_tokens: Optional[int]) -> str:
    """The per-variant table: mean ± std over seeds; n/a where a run recorded nothing."""
    def pm(row, key):  # speeds and large gains as integers, losses to 4 decimals; the spread like its mean
        mean, spread = row[f"{key}_mean"], row[f"{key}_std"]
        if math.isnan(mean):
            return "n/a"
        pattern = "{:,.0f}" if abs(mean) >= 100 else "{:.4f}"
        return pattern.format(mean) + ("" if math.isnan(spread) else " ± " + pattern.format(spread))

    def ratio(value):
        return "n/a" if math.isnan(value) else f"{value:.2f}x"

    head = ["residual", "runs (seeds)", "val loss", "tokens/s", "tokens/s vs residual", "activation vs residual",
            "composite gain fwd", "composite gain bwd", "peak composite gain fwd", "composite spectral norm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [row["residual"], f"{row['runs']} ({row['seeds']})", pm(row, "val_loss"), pm(row, "tokens_per_s"),
                 ratio(row["tokens_per_s_vs_residual"]), ratio(row["activation_bytes_vs_residual"]),
                 pm(row, "comp_gain_fwd"), pm(row, "comp_gain_bwd"), pm(row, "comp_gain_fwd_peak"),
                 pm(row, "comp_spectral_norm")]
        lines.append("| " + " | ".join(cells) + " |")
    budget = f"{val_tokens:,}" if val_tokens else "unknown"
    caption = (f"\nMean ± sample standard deviation over seeds. val loss: train.py's last validation loss, on the "
               f"first {budget} validation tokens (trainer.eval_batches x trainer.batch_size x data.seq_len, per "
               "process). tokens/s: median over logged steps. Composite gains: the last probe's worst sublayer, "
               "token max (mhc_lm.diagnostics); the spectral norm (the composite's largest singular value, same worst "
               "case) bounds variants with negative entries, whose Amax gain overstates it. n/a: not recorded by "
               "the runs.\n")
    return "\n".join(lines) + "\n" + caption


def _axes(ncols: int, width: float = 6.5, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, ncols, squeeze=False)[0]


def seeds_label(variant: str, count: int) -> str:
    return f"{variant} ({count} seed{'s' if count != 1 else ''})"


def band(series: list[list[tuple[float, float]]]):
    """(x, mean, min, max) over runs of (x, y) curves, on the points all of them have (by index)."""
    import numpy as np

    length = min(len(s) for s in series)
    if length == 0:
        return None
    xs = np.array([[p[0] for p in s[:length]] for s in series])
    ys = np.array([[p[1] for p in s[:length]] for s in series])
    return xs.mean(0), ys.mean(0), ys.min(0), ys.max(0)


def plot_loss_vs_tokens(runs: list[RunRecord], val_tokens: Optional[int], path: Path) -> Optional[Path]:
    """Validation loss against tokens seen: one curve per variant (mean over seeds), band min to max."""
    groups = {v: [r.curve for r in rs if r.curve] for v, rs in by_variant(runs).items()}
    groups = {v: c for v, c in groups.items() if c}
    if not groups:
        return None
    figure, (ax,) = _axes(1)
    for i, (variant, curves) in enumerate(groups.items()):
        x, mean, low, high = band(curves)
        ax.plot(x, mean, "-o", markersize=3, color=f"C{i % 10}", label=seeds_label(variant, len(curves)))
        if len(curves) > 1:
            ax.fill_between(x, low, high, color=f"C{i % 10}", alpha=0.2)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    budget = f"{val_tokens:,}" if val_tokens else "unknown"
    ax.set_title(f"train.py validation loss on the first {budget} validation tokens\n"
                 "line: mean over seeds, band: min to max", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_gains_vs_step(runs: list[RunRecord], path: Path) -> Optional[Path]:
    """Composite forward and backward gain (worst sublayer, token max) against step, log scale."""
    groups = {v: [r.gains for r in rs if r.gains] for v, rs in by_variant(runs).items()}
    groups = {v: g for v, g in groups.items() if g}
    if not groups:
        return None
    figure, axes = _axes(2)
    for column, (ax, direction) in enumerate(zip(axes, ("forward", "backward"))):
        for i, (variant, series) in enumerate(groups.items()):
            curves = [[(g[0], g[1 + column]) for g in gains] for gains in series]  # (step, gain)
            x, mean, low, high = band(curves)
            ax.plot(x, mean, "-o", markersize=3, color=f"C{i % 10}", label=seeds_label(variant, len(series)))
            if len(series) > 1:
                ax.fill_between(x, low, high, color=f"C{i % 10}", alpha=0.2)
        values = [g[1 + column] for series in groups.values() for gains in series for g in gains]
        if max(values) > 4 * min(values):  # geometric growth reads as a line; near 1, linear is clearer
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"composite {direction} gain")
        ax.set_title(f"composite {direction} Amax gain H_res[L-1]...H_res[l], worst sublayer, token max\n"
                     "line: mean over seeds, band: min to max", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def last_report(run_dir: Path) -> Optional[dict]:
    """The run's newest probe report (RUN/diagnostics/step_N/diagnostics.json), None without one."""
    reports = [d / "diagnostics.json" for d in RunDir(run_dir).list_diagnostics() if (d / "diagnostics.json").exists()]
    if not reports:
        return None
    report = json.loads(reports[-1].read_text())
    if (report.get("format"), report.get("version")) != (REPORT_FORMAT, REPORT_VERSION):
        raise ConfigError(f"{reports[-1]}: a diagnostics report of format {report.get('format')!r} version "
                          f"{report.get('version')!r}; allowed: {REPORT_FORMAT!r} version {REPORT_VERSION}")
    return report


def plot_h_res_side_by_side(runs: list[RunRecord], path: Path) -> Optional[Path]:
    """The token-mean H_res of every sublayer at the last probe, one panel per variant (its first seed),
    tiles in depth order (rows of 8), one color scale for all."""
    import numpy as np

    from .plots import h_res_mosaic

    reports = {}
    for variant, members in by_variant(runs).items():
        report = last_report(members[0].path)
        if report is not None:
            reports[variant] = (members[0].name, report)
    if not reports:
        return None
    mosaics = {v: h_res_mosaic(r, min(8, len(r["sublayers"]))) for v, (_, r) in reports.items()}
    largest = max(float(np.nanmax(np.abs(m))) for m in mosaics.values())
    negative = any(float(np.nanmin(m)) < 0 for m in mosaics.values())
    figure, axes = _axes(len(mosaics), width=4.0, height=4.0 + max(m.shape[0] for m in mosaics.values()) / 8)
    for ax, (variant, mosaic) in zip(axes, mosaics.items()):
        name, report = reports[variant]
        image = ax.imshow(mosaic, cmap="RdBu_r" if negative else "viridis", vmin=-largest if negative else 0,
                          vmax=largest)
        ax.set_title(f"{variant} ({name}, step {report['step']})\n{len(report['sublayers'])} sublayers, "
                     "rows of 8 in depth order", fontsize=8)
        ax.set_axis_off()
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    figure.suptitle("token-mean H_res at the last probe (row i: what new stream i reads)", fontsize=10)
    figure.savefig(path)
    return path


def select_finished(runs: list[RunRecord], unfinished: bool) -> tuple[list[RunRecord], list[RunRecord]]:
    """(the runs the report covers, the unfinished ones left out). A run still training (or stopped early)
    has an earlier step's loss: beside finished runs it would compare budgets that differ, so it is left
    out unless `unfinished`; ConfigError when nothing is finished yet."""
    done = [r for r in runs if r.finished]
    if unfinished:
        return runs, []
    if not done:
        listed = ", ".join(r.where for r in runs)
        raise ConfigError(f"SWEEP_DIR: no run has finished yet ({listed}); allowed: wait, or --unfinished to "
                          "compare them at the steps they reached")
    return done, [r for r in runs if not r.finished]


def compare(paths: list[Path], out_dir: Path, unfinished: bool = False,
            keep: Optional[Path] = None) -> tuple[list[dict], dict[str, Path]]:
    """Read the runs, write the tables and plots into out_dir; returns (per-variant rows, written files).
    Only finished runs are compared unless `unfinished`; runs.md lists every run. With `keep`, every
    run's records are copied there first (keep_run), so the report rebuilt from `keep` is this one."""
    found = find_runs(paths)
    runs, left_out = select_finished(found, unfinished)
    if keep is not None:
        for run in found:
            if run.path.resolve() != (keep / run.name).resolve():
                keep_run(run, keep)
    val_tokens = check_one_budget(runs)
    rows = summarize(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"summary.md": out_dir / "summary.md", "summary.csv": out_dir / "summary.csv",
             "runs.md": out_dir / "runs.md", "runs.csv": out_dir / "runs.csv"}
    note = ("" if not left_out else "Left out, not finished: "
            + ", ".join(r.where for r in left_out) + ".\n")
    files["summary.md"].write_text(summary_markdown(rows, val_tokens) + note)
    write_csv(rows, files["summary.csv"])
    run_rows = [r.row() for r in sorted(found, key=lambda r: r.name)]
    files["runs.md"].write_text(markdown_table(run_rows))
    write_csv(run_rows, files["runs.csv"])
    for name, plot in (("loss_vs_tokens.png", lambda p: plot_loss_vs_tokens(runs, val_tokens, p)),
                       ("gains_vs_step.png", lambda p: plot_gains_vs_step(runs, p)),
                       ("h_res_heatmaps.png", lambda p: plot_h_res_side_by_side(runs, p))):
        if plot(out_dir / name) is not None:
            files[name] = out_dir / name
    return rows, files


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhc_lm.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="SWEEP_DIR",
                        help="a sweep directory (runs/sweeps/<name>), run directories or folders of runs")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP_DIR/compare)")
    parser.add_argument("--unfinished", action="store_true",
                        help="also compare runs that have not reached trainer.max_steps (at the step they reached)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="copy what the report reads of each run (config, those metrics, the last "
                             "probe report) into DIR/<run>: the report rebuilds from DIR without the checkpoints")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0] / "compare"
    try:
        rows, files = compare(args.paths, out, unfinished=args.unfinished, keep=args.keep)
    except ConfigError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    runs = sum(r["runs"] for r in rows)
    print((out / "summary.md").read_text())
    print(f"{runs} runs, {len(rows)} variants | wrote {', '.join(str(p) for p in files.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
