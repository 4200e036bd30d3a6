"""PNG plots of scores: a histogram, and precision-recall when noisy rows are known.

matplotlib is imported inside each function (an optional dependency) and used through its
object API (``Figure`` + Agg canvas), so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ._utils.imports import require_matplotlib
from ._utils.io import atomic_path


def _figure():
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure, path: str | os.PathLike) -> Path:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def plot_histogram(
    scores: torch.Tensor | np.ndarray, path: str | os.PathLike, title: str, is_noisy: np.ndarray | None = None
) -> Path:
    """Histogram of ``scores`` (``[N]``), split into clean and noisy rows when ``is_noisy`` (``[N]`` bool) is given."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    figure, axes = _figure()
    bins = np.histogram_bin_edges(values, bins=50)
    if is_noisy is None:
        axes.hist(values, bins=bins, color="tab:blue")
    else:
        noisy = np.asarray(is_noisy, dtype=bool)
        axes.hist([values[~noisy], values[noisy]], bins=bins, stacked=True, color=["tab:blue", "tab:red"],
                  label=[f"clean ({int((~noisy).sum())})", f"noisy ({int(noisy.sum())})"])
        axes.legend()
    axes.set(title=title, xlabel="score", ylabel="rows")
    axes.set_yscale("log")
    return _save(figure, path)


def plot_precision_recall(scores: torch.Tensor | np.ndarray, is_noisy: np.ndarray, path: str | os.PathLike, title: str) -> Path:
    """Precision-recall curve of finding the ``is_noisy`` rows by descending ``scores``."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    values, noisy = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(is_noisy, dtype=bool)
    precision, recall, _ = precision_recall_curve(noisy, values)
    figure, axes = _figure()
    axes.plot(recall, precision, color="tab:red", label=f"AP = {average_precision_score(noisy, values):.3f}")
    axes.axhline(noisy.mean(), color="gray", linestyle="--", label=f"random = {noisy.mean():.3f}")
    axes.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    axes.legend()
    return _save(figure, path)
