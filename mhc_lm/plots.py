"""The diagnostics pictures, drawn from the report's numbers only (so the PNGs show exactly the JSON).

Matplotlib's Agg backend through its object API (no pyplot, no display, no global state).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SPECTRAL_NOTE = ("H_res can have negative entries: abs row/column sums overstate the gain, "
                 "the spectral norm is the bound that matters")


def _figure(width: float, height: float, top: float, bottom: float, left: float = 0.7, right: float = 0.2) -> Figure:
    """A figure with fixed margins in inches (a layout engine would draw every figure twice over)."""
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(top=1 - top / height, bottom=bottom / height, left=left / width, right=1 - right / width)
    return figure


def _title(report: dict[str, Any], what: str) -> str:
    step = "" if report["step"] is None else f", step {report['step']}"
    return f"{what}: {report['variant']} n={report['n']}{step}"


def _series(report: dict[str, Any], key: str) -> list[float]:
    return [s[key] for s in report["sublayers"]]


def _depth_axis(ax, report: dict[str, Any]) -> None:
    names = [s["name"] for s in report["sublayers"]]
    stride = max(1, math.ceil(len(names) / 16))
    ax.set_xticks(range(0, len(names), stride), names[::stride], rotation=60, fontsize=7)
    ax.set_xlabel("sublayer l (depth order)")
    ax.grid(alpha=0.3)


def _mean_and_max(ax, report, key: str, label: str, color: str) -> None:
    depth = range(len(report["sublayers"]))
    ax.plot(depth, _series(report, f"{key}_mean"), "-o", color=color, markersize=3, label=f"{label} (token mean)")
    ax.plot(depth, _series(report, f"{key}_max"), "--", color=color, label=f"{label} (token max)")


def plot_gain_vs_depth(report: dict[str, Any], path: Path) -> Figure:
    """Amax gains (single and composite to the output) and spectral norms against depth, log scale."""
    figure = _figure(12, 5, top=1.0, bottom=0.9)
    amax, spectral = figure.subplots(1, 2)
    for key, label, color in (("gain_fwd", "H_res fwd", "tab:blue"), ("gain_bwd", "H_res bwd", "tab:cyan"),
                              ("comp_gain_fwd", "composite fwd", "tab:red"),
                              ("comp_gain_bwd", "composite bwd", "tab:orange")):
        _mean_and_max(amax, report, key, label, color)
    amax.set_title("Amax gain (max abs row sum = fwd, column sum = bwd)", fontsize=9)
    for key, label, color in (("spectral_norm", "H_res", "tab:green"),
                              ("comp_spectral_norm", "composite", "tab:purple")):
        _mean_and_max(spectral, report, key, label, color)
    spectral_bound = report["bound"] == "spectral_norm"
    spectral.set_title("spectral norm" + (" (the bound that matters here)" if spectral_bound else ""), fontsize=9)
    values = [v for s in report["sublayers"] for k, v in s.items() if "gain" in k or "spectral_norm" in k]
    for ax in (amax, spectral):
        if max(values) > 4 * min(values):  # geometric growth reads as a straight line; near 1, linear is clearer
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        _depth_axis(ax, report)
        ax.legend(fontsize=7)
    subtitle = "composite = H_res[L-1]...H_res[l], sublayer l to the output; solid: token mean, dashed: token max"
    if spectral_bound:
        subtitle += "\n" + SPECTRAL_NOTE
    figure.suptitle(_title(report, "gain against depth") + "\n" + subtitle, fontsize=10)
    figure.savefig(path)
    return figure


def h_res_mosaic(report: dict[str, Any], cols: int) -> np.ndarray:
    """The token-mean H_res of every sublayer as n x n tiles, `cols` per row, NaN gutters between them."""
    subs, n = report["sublayers"], report["n"]
    rows, pitch = math.ceil(len(subs) / cols), n + 1  # a tile and its gutter
    mosaic = np.full((rows * pitch - 1, cols * pitch - 1), np.nan)
    for k, sub in enumerate(subs):
        r, c = divmod(k, cols)
        mosaic[r * pitch: r * pitch + n, c * pitch: c * pitch + n] = sub["h_res_mean"]
    return mosaic


def plot_h_res_heatmaps(report: dict[str, Any], path: Path) -> Figure:
    """The token-mean H_res of every sublayer (row i: what new stream i reads), as tiles of one image.

    One image with NaN gutters (drawn transparent) rather than one axes per sublayer: a deep model stays
    cheap to draw.
    """
    subs, n = report["sublayers"], report["n"]
    cols = min(8, len(subs))
    rows = math.ceil(len(subs) / cols)
    pitch = n + 1  # a tile and its gutter
    mosaic = h_res_mosaic(report, cols)
    largest = float(np.nanmax(np.abs(mosaic)))
    negative = bool(np.nanmin(mosaic) < 0)
    figure = _figure(1.3 * cols + 1.5, 1.3 * rows + 0.8, top=0.6, bottom=0.1, left=0.1, right=0.1)
    ax = figure.subplots()
    cmap = "RdBu_r" if negative else "viridis"  # diverging, centred on 0, when the sign matters
    image = ax.imshow(mosaic, cmap=cmap, vmin=-largest if negative else 0, vmax=largest)
    annotate = n <= 4 and len(subs) <= 16
    for k, sub in enumerate(subs):
        r, c = divmod(k, cols)
        ax.text(c * pitch + (n - 1) / 2, r * pitch - 0.7, sub["name"], ha="center", fontsize=7)
        if not annotate:
            continue
        for (i, j), value in np.ndenumerate(np.asarray(sub["h_res_mean"])):
            dark = abs(value) > 0.6 * largest if negative else value < 0.6 * largest  # the map's dark cells
            color = "white" if dark else "black"
            ax.text(c * pitch + j, r * pitch + i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
    ax.set_axis_off()
    figure.colorbar(image, ax=ax, shrink=0.8)
    figure.suptitle(_title(report, "token-mean H_res (row i: what new stream i reads)"), fontsize=10)
    figure.savefig(path)
    return figure


def plot_spectra(report: dict[str, Any], path: Path) -> Figure:
    """Singular values of the token-mean H_res per sublayer, with the per-token extremes as a band."""
    figure = _figure(8, 5, top=0.8, bottom=0.9)
    ax = figure.subplots()
    subs = report["sublayers"]
    depth = range(len(subs))
    for k in range(report["n"]):
        ax.plot(depth, [s["svals_mean_matrix"][k] for s in subs], "-o", markersize=3,
                label=f"sigma_{k + 1} of the token-mean H_res")
    ax.fill_between(depth, _series(report, "sigma_min_min"), _series(report, "spectral_norm_max"), alpha=0.15,
                    color="gray", label="per-token range [min sigma_min, max sigma_1]")
    if report["n"] > 1:
        ax.plot(depth, _series(report, "sigma2_mean"), ":", color="black", label="sigma_2 (token mean): mixing")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    _depth_axis(ax, report)
    ax.set_ylabel("singular value")
    ax.legend(fontsize=7)
    note = "\n" + SPECTRAL_NOTE if report["bound"] == "spectral_norm" else ""
    figure.suptitle(_title(report, "spectra of H_res") + note, fontsize=10)
    figure.savefig(path)
    return figure


DRAWERS = {"gain_vs_depth": plot_gain_vs_depth, "h_res_heatmaps": plot_h_res_heatmaps, "spectra": plot_spectra}


def draw_all(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    paths = {}
    for name, draw in DRAWERS.items():
        paths[name] = out_dir / f"{name}.png"
        draw(report, paths[name])
    return paths
