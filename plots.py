"""Every figure a run saves and logs: confusion matrices, training curves, per-class changes, sample predictions.

Figures are written to files and logged, never shown: this is the one place the matplotlib backend is chosen.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

import images  # noqa: E402


def plot_confusion_matrix(matrix: np.ndarray, label_names: list[str], path: Path | None = None, title: str = ""):
    """A confusion-matrix figure (counts annotated for up to 20 classes); saved to `path` if given."""
    n = len(label_names)
    size = min(4 + 0.4 * n, 16)
    figure, axis = plt.subplots(figsize=(size, size * 0.85))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046)
    if n <= 20:
        axis.set_xticks(range(n), [str(name) for name in label_names], rotation=45, ha="right")
        axis.set_yticks(range(n), [str(name) for name in label_names])
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, column), value in np.ndenumerate(matrix):
            axis.text(column, row, str(value), ha="center", va="center",
                      color="white" if value > threshold else "black", fontsize=9)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title or "confusion matrix")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def plot_training_curves(log_history: list[dict], path: Path | None = None,
                         metrics=("accuracy", "f1_macro", "top5_accuracy")):
    """Loss (train and validation, left) and validation `metrics` (right) against the optimizer step,
    from a Trainer's `state.log_history`; saved to `path` if given."""
    def series(key):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        return [p[0] for p in points], [p[1] for p in points]

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("loss", "train loss", ".-"), ("eval_loss", "validation loss", "o-")):
        steps, values = series(key)
        if steps:
            loss_axis.plot(steps, values, style, label=label)
    for name in metrics:
        steps, values = series(f"eval_{name}")
        if steps:
            metric_axis.plot(steps, values, "o-", label=f"validation {name}")
    for axis, title in ((loss_axis, "loss"), (metric_axis, "validation metrics")):
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def plot_per_class_change(before: np.ndarray, after: np.ndarray, names: list[str], path: Path, show: int = 15):
    """Per-class accuracy after minus before, for the classes that changed: the `show` largest gains and the
    `show` largest losses, each bar labelled before -> after, on an axis symmetric around zero."""
    change = np.nan_to_num(after - before)
    changed = np.flatnonzero(change)
    gains = changed[np.argsort(-change[changed])][:show]
    gains = gains[change[gains] > 0]
    losses = changed[np.argsort(change[changed])][:show]
    losses = losses[change[losses] < 0]
    order = np.concatenate([losses, gains[::-1]]).astype(int)
    figure, axis = plt.subplots(figsize=(8, 0.3 * max(len(order), 4) + 1.5))
    axis.barh(range(len(order)), change[order], color=["tab:green" if c > 0 else "tab:red" for c in change[order]])
    for position, index in enumerate(order):
        axis.annotate(f"{before[index]:.2f} -> {after[index]:.2f}", (change[index], position), fontsize=7, va="center",
                      xytext=(3 if change[index] > 0 else -3, 0), textcoords="offset points",
                      ha="left" if change[index] > 0 else "right")
    axis.set_yticks(range(len(order)), [names[i] for i in order], fontsize=8)
    limit = 1.25 * max(np.abs(change).max(), 0.01)
    axis.set_xlim(-limit, limit)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("accuracy change (trained - zero_shot)")
    if not len(order):
        axis.text(0, 0.5, "no class changed", ha="center", va="center", transform=axis.get_yaxis_transform())
    axis.set_title(f"per-class accuracy: {(change > 0).sum()} classes up, {(change < 0).sum()} down, "
                   f"{(change == 0).sum()} unchanged; mean {np.nanmean(after - before):+.4f}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure


def plot_sample_predictions(raw_dataset, before, after, names: list[str], path: Path, count: int, seed: int):
    """A grid of validation images titled true class / zero-shot / trained prediction (two ZeroShotResults);
    green when the trained prediction is right."""
    picked = np.random.default_rng(seed).choice(len(after.rows), size=min(count, len(after.rows)), replace=False)
    columns = int(np.ceil(np.sqrt(len(picked))))
    rows = int(np.ceil(len(picked) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    zero_shot_by_row = dict(zip(before.rows.tolist(), before.predictions.tolist()))
    for axis in axes.flat:
        axis.axis("off")
    for axis, position in zip(axes.flat, picked):
        row, label, predicted = int(after.rows[position]), after.labels[position], after.predictions[position]
        axis.imshow(images.open_rgb(raw_dataset[row]["image"]))
        axis.set_title(f"{names[label][:18]}\nzs: {names[zero_shot_by_row[row]][:16]}\nnow: {names[predicted][:16]}",
                       fontsize=7, color="tab:green" if predicted == label else "tab:red")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure
