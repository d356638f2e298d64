"""Metrics and reports against hand-computed values; the results.json contract."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
import plots

LABELS = [0, 0, 0, 1, 1, 2]
PREDICTIONS = [0, 0, 1, 1, 2, 2]


def test_classification_metrics_by_hand():
    metrics = evaluate.classification_metrics(LABELS, PREDICTIONS)
    # per class: precision 2/2, 1/2, 1/2; recall 2/3, 1/2, 1/1; support 3, 2, 1
    precision, recall = [1, 0.5, 0.5], [2 / 3, 0.5, 1.0]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    support = np.array([3, 2, 1]) / 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision_macro"] == pytest.approx(np.mean(precision))
    assert metrics["recall_macro"] == pytest.approx(np.mean(recall))
    assert metrics["f1_macro"] == pytest.approx(np.mean(f1))
    assert metrics["precision_weighted"] == pytest.approx(np.dot(precision, support))
    assert metrics["f1_weighted"] == pytest.approx(np.dot(f1, support))


def test_compute_metrics_takes_logits_or_argmax_ids():
    logits = np.eye(3)[PREDICTIONS] * 5.0
    from_logits = evaluate.compute_metrics(SimpleNamespace(predictions=logits, label_ids=np.array(LABELS)))
    ids, scores = evaluate.preprocess_logits_for_metrics(torch.tensor(logits), None)
    assert ids.tolist() == PREDICTIONS
    assert scores.numpy() == pytest.approx(np.exp(5.0) / (np.exp(5.0) + 2))     # the winning softmax probability
    from_ids = evaluate.compute_metrics(SimpleNamespace(predictions=ids.numpy(), label_ids=np.array(LABELS)))
    assert from_logits == from_ids and from_ids["accuracy"] == pytest.approx(4 / 6)


def test_confusion_recall_and_pairs():
    matrix = evaluate.confusion(LABELS, PREDICTIONS, 4)
    assert matrix.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    recall = evaluate.per_class_recall(matrix)
    assert recall[:3] == pytest.approx([2 / 3, 0.5, 1.0]) and np.isnan(recall[3])
    pairs = evaluate.most_confused_pairs(matrix, ["a", "b", "c", "d"])
    assert {(p["true"], p["predicted"], p["count"]) for p in pairs} == {("a", "b", 1), ("b", "c", 1)}


def test_report_table_and_plot(tmp_path):
    report = evaluate.classification_report_text(LABELS, PREDICTIONS, ["neg", "neutral", "pos"])
    assert "neutral" in report and "0.5000" in report
    table = evaluate.results_table({"svc": {"test": {"accuracy": 0.5, "f1_macro": 0.25}}})
    assert "svc" in table and "0.5000" in table and "0.2500" in table
    figure = plots.plot_confusion_matrix(evaluate.confusion(LABELS, PREDICTIONS, 3), ["a", "b", "c"],
                                            tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 1000 and figure is not None


def test_top_classes_are_best_first_with_the_best_ones_probability():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 5.5, 0.0]])
    ids, probability = evaluate.top_classes(logits, 3)
    assert ids.tolist() == [[1, 3, 2], [2, 0, 3]] and isinstance(probability, np.ndarray)
    np.testing.assert_allclose(probability, logits.softmax(dim=-1).max(dim=-1).values.numpy(), rtol=1e-6)


def test_text_tables_align_their_columns():
    import tables

    text = tables.text_table(["rank", "name", "score"], [[1, "a long name", "0.5000"], [10, "b", "failed"]],
                             right=(0, 2))
    assert text.splitlines() == ["rank  name          score",
                                 "----  -----------  ------",
                                 "   1  a long name  0.5000",
                                 "  10  b            failed"]
    assert tables.markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |"


def test_results_file_contract(tmp_path):
    metrics = {"svc": {"validation": {"accuracy": 0.9}, "test": {"accuracy": 0.8}}}
    path = evaluate.write_results(tmp_path, "exercise_x", {"seed": 1}, metrics, {"total": 1.5},
                                  {"name": "m", "parameters": np.int64(10)}, label_names=["a", "b"])
    results = json.loads(path.read_text())
    assert path.name == "results.json"
    assert {"exercise", "config", "metrics", "timing", "model", "environment"} <= set(results)
    assert results["model"]["parameters"] == 10 and results["label_names"] == ["a", "b"]
    assert "torch" in results["environment"]["libraries"] and results["environment"]["device"] in ("cpu", "cuda")
