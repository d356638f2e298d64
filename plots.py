"""Every figure the project draws: confusion matrices, training curves, per-class changes, sample predictions,
few-shot and interpolation curves, and the report's comparison and sweep plots.

Figures are written to files and logged, never shown: this is the one place the matplotlib backend is chosen.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

import images  # noqa: E402
from utils import write_atomic  # noqa: E402


def save_figure(figure, path: Path) -> None:
    """Render the figure in memory, then write the file whole (utils.write_atomic): savefig straight to the file
    would leave a cut-off image, taken for the run's figure, when the disk fills or a signal comes mid-write."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
    write_atomic(path, buffer.getvalue())


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
        save_figure(figure, path)
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
        save_figure(figure, path)
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
    save_figure(figure, path)
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
    save_figure(figure, path)
    return figure


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot_ablation(sweep: dict, rows: list[dict], path: Path) -> Path | None:
    """Accuracy against the first swept key, one line per combination of the others."""


    axes = list(sweep["axes"])
    x_key, others = axes[0], axes[1:]
    splits = [split for split in ("validation", "test") if any(row[split] is not None for row in rows)]
    if not splits:
        return None
    x_values = sweep["axes"][x_key]
    numeric = all(_as_number(value) is not None for value in x_values)
    figure, panels = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for panel, split in zip(panels[0], splits):
        groups = {}
        for row in rows:
            label = ", ".join(f"{key}={row['values'].get(key)}" for key in others) or split
            groups.setdefault(label, []).append(row)
        for label, members in groups.items():
            points = [(row["values"][x_key], row[split]) for row in members if row[split] is not None]
            if numeric:
                points.sort(key=lambda point: _as_number(point[0]))
                xs = [_as_number(point[0]) for point in points]
            else:
                xs = [x_values.index(point[0]) for point in points]
            panel.plot(xs, [point[1] for point in points], "o-", label=label)
            for x, (_, accuracy) in zip(xs, points):   # the values themselves: the axis spans all of 0..1
                panel.annotate(f"{accuracy:.3f}", (x, accuracy), textcoords="offset points", xytext=(0, 6),
                               ha="center", fontsize=7)
        if numeric:
            numbers = [_as_number(value) for value in x_values]
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
                panel.set_xscale("log")
        else:
            panel.set_xticks(range(len(x_values)), x_values, rotation=20)
        panel.set_xlabel(x_key)
        panel.set_ylabel(f"{split} accuracy")
        panel.set_ylim(0, 1.05)     # from zero: a zoomed axis makes 0.78 vs 0.79 look like a landslide
        panel.grid(alpha=0.3)
        if len(groups) > 1:
            panel.legend(fontsize=8)
    figure.suptitle(f"sweep {sweep['name']}")
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return path


def plot_comparison(rows: list[dict], path: Path) -> Path | None:
    """The report's best run per approach as bars of accuracy (0 to 1), coloured by exercise."""
    rows = [row for row in rows if row["accuracy"] is not None]
    if not rows:
        return None
    colors = {"exercise_1": "tab:blue", "exercise_2": "tab:orange", "exercise_3": "tab:green"}
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    labels = [f"{row['approach']} ({row['model']}, {row['data'].split('/')[-1]}, {row['split']})" for row in rows]
    axis.barh(range(len(rows)), [row["accuracy"] for row in rows],
              color=[colors.get(row["exercise"], "tab:gray") for row in rows])
    for index, row in enumerate(rows):
        axis.text(row["accuracy"], index, f" {row['accuracy']:.3f}", va="center", fontsize=8)
    axis.set_yticks(range(len(rows)), labels, fontsize=8)
    axis.set_xlim(0, 1.08)
    axis.set_xlabel("accuracy")
    axis.set_title("best run per approach (chosen on validation)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return path


def plot_few_shot(points: list[tuple], zero_shot: float, path: Path):
    """Linear-probe accuracy against labelled images per class, with zero-shot as a line (the layout of the CLIP
    paper's figure 6). `points`: (images per class, accuracy, the probe_shots entry) per probe."""
    figure, axis = plt.subplots(figsize=(6, 4))
    points = sorted(points)
    axis.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:blue", label="linear probe")
    for shots, accuracy, label in points:
        axis.annotate(str(label), (shots, accuracy), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axis.axhline(zero_shot, color="tab:green", linestyle="--", label=f"zero-shot ({zero_shot:.3f})")
    axis.set_xscale("log", base=2)
    axis.set_xticks([p[0] for p in points], [f"{p[0]:g}" for p in points])
    return _finish_curve(figure, axis, "labelled train images per class", "validation accuracy",
                         "few-shot linear probes vs zero-shot", path)


def plot_interpolation(alphas: list[float], accuracy: dict, stage: str, path: Path):
    """Accuracy against the scale of the trained update (0: the model before training, 1: trained), one line per
    image set (`accuracy`: set -> one accuracy per alpha)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for (split, values), color in zip(accuracy.items(), ("tab:blue", "tab:orange", "tab:green")):
        axis.plot(alphas, values, "o-", color=color, label=split)
    return _finish_curve(figure, axis, f"scale of the {stage} update (0 = before training, 1 = trained)", "accuracy",
                         "weight-space interpolation (WiSE-FT)", path)


def _finish_curve(figure, axis, x_label: str, y_label: str, title: str, path: Path):
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    return figure
