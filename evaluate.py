"""Scores of every exercise: metrics, confusion matrices, classification reports, the results file,
and the per-sample predictions files.

Pure functions over label arrays, so each can be checked against hand-computed values.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

import faults
import tables
from utils import LabError, environment_info, write_atomic

RESULTS_FILE = "results.json"
CONFUSION_FILE = "confusion_matrices.json"   # beside results.json: 200 classes make 40,000 cells a matrix
PREDICTIONS_DIR = "predictions"   # <run>/predictions/<stage>_<split>.csv
REWRITE = "rerun the exercise that made the run to write it again"     # for a damaged file a reader finds


def classification_metrics(labels, predictions, num_labels: int | None = None) -> dict:
    """Accuracy, plus precision / recall / F1 both macro- and support-weighted over classes.

    Classes that never occur (in labels or predictions) are left out of the averages, as
    scikit-learn does; a class that is predicted but absent from labels counts with recall 0.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    present = np.union1d(labels, predictions)
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predictions, labels=present, average=average, zero_division=0)
        metrics[f"precision_{average}"] = float(precision)
        metrics[f"recall_{average}"] = float(recall)
        metrics[f"f1_{average}"] = float(f1)
    return metrics


def preprocess_logits_for_metrics(logits, labels):
    """For Trainer: keep only (argmax id, its softmax probability) per row, so evaluation memory grows
    by two numbers per example, not by the number of classes."""
    if isinstance(logits, tuple):
        logits = logits[0]
    probabilities = logits.float().softmax(dim=-1)
    scores, ids = probabilities.max(dim=-1)
    return ids, scores


def top_classes(logits, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For (n, classes) logits (a torch tensor): the ids of each row's `k` largest, best first, (n, k), and the
    softmax probability of the best, (n,), both as numpy arrays on the CPU."""
    top = logits.topk(k, dim=-1)
    return top.indices.cpu().numpy(), (top.values[:, 0] - logits.logsumexp(dim=-1)).exp().cpu().numpy()


def compute_metrics(eval_pred) -> dict:
    """For Trainer: accepts (ids, scores) from preprocess_logits_for_metrics, argmax ids or raw logits."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    predictions = np.asarray(predictions)
    if predictions.ndim > 1:
        predictions = predictions.argmax(axis=-1)
    return classification_metrics(labels, predictions)


def confusion(labels, predictions, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) counts, rows = true class, columns = predicted class."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def per_class_recall(matrix: np.ndarray) -> np.ndarray:
    """Recall of each class (row-normalised diagonal); NaN for classes with no examples."""
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), np.nan)


def most_confused_pairs(matrix: np.ndarray, label_names: list[str], top: int = 10) -> list[dict]:
    """The largest off-diagonal cells: which true class is most often taken for which."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:top]
    pairs = []
    for true, predicted in zip(*np.unravel_index(flat, off.shape)):
        if off[true, predicted] == 0:
            break
        pairs.append({"true": label_names[true], "predicted": label_names[predicted],
                      "count": int(off[true, predicted])})
    return pairs


def classification_report_text(labels, predictions, label_names: list[str]) -> str:
    from sklearn.metrics import classification_report

    return classification_report(labels, predictions, labels=list(range(len(label_names))),
                                 target_names=[str(name) for name in label_names], digits=4, zero_division=0)


def write_results(run_dir: Path, exercise: str, config: dict, metrics: dict, timing: dict,
                  model: dict, confusion_matrices: dict | None = None, **extra) -> Path:
    """Write `<run_dir>/results.json`: exercise, config, metrics (stage -> split -> metric),
    timing (seconds per phase), model (name, parameter counts), environment, plus any extras.
    Confusion matrices go to CONFUSION_FILE beside it, one matrix row per line, so results.json stays
    small to read and diff whatever the number of classes."""
    results = {"exercise": exercise, "config": config, "metrics": metrics, "timing": timing,
               "model": model, "environment": environment_info(), **extra}
    if confusion_matrices is not None:
        _write_json(Path(run_dir) / CONFUSION_FILE, confusion_matrices)
        results["confusion_matrices"] = CONFUSION_FILE
    return _write_json(Path(run_dir) / RESULTS_FILE, results)


def read_confusion_matrices(run_dir: Path) -> dict:
    """What write_results wrote to CONFUSION_FILE: stage -> (split ->) rows of counts; LabError when damaged."""
    import artifacts

    return artifacts.read_json(Path(run_dir) / CONFUSION_FILE, REWRITE)


def _write_json(path: Path, contents) -> Path:
    """Indented JSON whose innermost lists of numbers stay on one line each; written whole or not at all."""
    text = json.dumps(contents, indent=2, default=_json_default)
    text = re.sub(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
                  lambda match: "[" + ", ".join(match.group(1).replace(",", " ").split()) + "]", text)
    write_atomic(path, text.encode("utf-8"))
    return path


def write_predictions(run_dir: Path, stage: str, split: str, rows, inputs, labels, predicted, scores,
                      label_names: list[str], top_k=None) -> Path:
    """Write `<run_dir>/predictions/<stage>_<split>.csv`, one line per evaluated example: `id` (its row in
    the split), `input` (text or image path), `label` and `predicted` (class names), `score` (the winning
    class's probability, or an SVC's margin) and, with `top_k` ((n, k) class ids, best first), `top5`:
    the class names joined by `|`."""
    path = Path(run_dir) / PREDICTIONS_DIR / f"{stage}_{split}.csv"
    inputs = list(inputs)
    faults.make_folder(path.parent)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["id", "input", "label", "predicted", "score", *(["top5"] if top_k is not None else [])])
    for index, row in enumerate(rows):
        line = [int(row), inputs[index], label_names[int(labels[index])], label_names[int(predicted[index])],
                f"{float(scores[index]):.6g}"]
        if top_k is not None:
            line.append("|".join(label_names[int(k)] for k in top_k[index]))
        writer.writerow(line)
    write_atomic(path, text.getvalue().encode("utf-8"))
    return path


def read_predictions(path: Path) -> list[dict]:
    """The rows of a predictions file, `id` as int and `score` as float; LabError naming the file (and the line)
    when it is not one: empty, cut short, not UTF-8, without the columns write_predictions writes."""
    import artifacts

    artifacts.check_file(path, REWRITE)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in ("id", "input", "label", "predicted", "score") if name not in reader.fieldnames]
            if missing:
                raise LabError(f"{path} has no column {missing[0]!r} (columns: {reader.fieldnames}); {REWRITE}")
            rows = []
            for row in reader:
                try:
                    rows.append({**row, "id": int(row["id"]), "score": float(row["score"])})
                except (TypeError, ValueError):     # a cut-short line leaves its last cells None or part of a number
                    raise LabError(f"{path} line {reader.line_num} is not a prediction (id {row['id']!r}, score "
                                   f"{row['score']!r}): cut short or overwritten; {REWRITE}") from None
            return rows
    except UnicodeDecodeError as error:
        raise LabError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); {REWRITE}") from None


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def results_table(metrics: dict, columns=("accuracy", "precision_macro", "recall_macro", "f1_macro")) -> str:
    """A plain-text table, one row per (stage, split)."""
    rows = [[stage, split, *(_format(values.get(column)) for column in columns)]
            for stage, splits in metrics.items() for split, values in splits.items()]
    return tables.text_table(["stage", "split", *columns], rows)


def _format(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


