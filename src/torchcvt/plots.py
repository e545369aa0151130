"""The PNGs that training and evaluation write: learning curves and the confusion matrix.

Figures are built with ``matplotlib.figure.Figure`` and saved by the Agg (PNG) canvas, never through
``pyplot``: no global figure state, no GUI backend, safe in headless jobs and threads. Every file is
written through a temporary file and a rename, so a viewer never sees half a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_save

# Class names are printed on the axes up to this many classes; beyond, only the colours say anything.
_MAX_TICK_LABELS = 40
# Cell counts are printed up to this many classes.
_MAX_CELL_TEXT = 20


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    # The temporary name ends in .tmp, so the format must be given explicitly.
    atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=100), path)
    return path


def plot_learning_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Train/val loss (left) and train/val top-1 and val top-5 in % (right) against the epoch, on
    integer epoch ticks.

    ``history``: the rows of ``metrics.jsonl`` (keys ``epoch``, ``train_loss``, ``val_loss``,
    ``train_top1``, ``val_top1`` and, with more than 5 classes, ``val_top5``; accuracies as fractions).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        loss_ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    for key, label in (("train_top1", "train top-1"), ("val_top1", "val top-1"), ("val_top5", "val top-5")):
        if not all(key in row for row in history):
            continue  # top-5 of 5 classes or fewer: always 100 %, not recorded (nor in a run's rows from before it was)
        acc_ax.plot(epochs, [100 * row[key] for row in history], marker="o", markersize=3, label=label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if history:
        best = max(history, key=lambda row: row["val_top1"])
        acc_ax.set_title(f"accuracy (best val top-1 {100 * best['val_top1']:.2f} % at epoch {best['epoch']})")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a 2-epoch run has no epoch 1.5
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(
    confusion: torch.Tensor | np.ndarray, labels: Sequence[str], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Rows: true class, columns: predicted class; colour: the fraction of the row (recall per
    cell), so rare classes are as visible as common ones; text: the counts (up to 20 classes)."""
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    n = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    side = min(4 + 0.45 * n, 20)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of the true class", shrink=0.8)
    if n <= _MAX_TICK_LABELS:
        ticks = np.arange(n)
        ax.set_xticks(ticks, labels=list(labels), rotation=90 if max(map(len, labels), default=0) > 2 else 0)
        ax.set_yticks(ticks, labels=list(labels))
    if n <= _MAX_CELL_TEXT:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix")
    return _save(fig, path)
