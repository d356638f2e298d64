"""Exercise 1 end to end: a tiny random DistilBERT (smoke) and the real MiniLM (slow)."""
import json

import pytest

import subprocess
import sys

import evaluate
import exercise_1
import saved_classifiers
import sweep
import utils
from conftest import ROOT, write_csv_dataset


def run(tmp_path, *overrides):
    run_dir = exercise_1.main([f"output_dir={tmp_path}", "wandb_mode=disabled", *overrides])
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_smoke_with_both_loggers_and_cache(tmp_path, tiny_distilbert, rt_dir, capsys):
    args = (f"model_name={tiny_distilbert}", f"dataset={rt_dir}", "max_train_samples=200",
            "max_eval_samples=60", "eval_batch_size=16", "run_name=smoke")
    run_dir, results = run(tmp_path, *args, "wandb_mode=offline", "tensorboard=true")
    assert results["exercise"] == "exercise_1"
    assert set(results["metrics"]) == {"svc", "logreg"}
    for stage in ("svc", "logreg"):
        assert set(results["metrics"][stage]) == {"validation", "test"}
        for values in results["metrics"][stage].values():
            assert 0.0 <= values["accuracy"] <= 1.0 and "f1_macro" in values
        assert (run_dir / f"confusion_{stage}_test.png").exists()
    assert results["label_names"] == ["neg", "pos"]
    assert results["data_sizes"] == {"train": 200, "validation": 60, "test": 60}
    assert results["model"]["parameters"] > 0 and results["model"]["hidden_size"] == 32
    assert {"load_data", "load_model", "features", "svc", "logreg", "total"} <= set(results["timing"])
    assert results["config"]["max_train_samples"] == 200
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert sweep.WANDB_METRICS["exercise_1"] in events.Tags()["scalars"], "a W&B sweep maximises what is logged"
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert "reused cached" not in capsys.readouterr().out

    second_dir, second = run(tmp_path, *args)
    assert second_dir.name == "smoke-2", "a second run must not mix its files into the first"
    assert "reused cached features" in capsys.readouterr().out
    assert second["metrics"] == results["metrics"], "same seed and features -> same metrics"

    _, mean_pooled = run(tmp_path, *args, "pooling=mean", "run_name=mean")
    assert "reused cached" not in capsys.readouterr().out, "pooling is part of the cache key"


def test_a_damaged_feature_cache_is_recomputed_to_the_same_result(tmp_path, tiny_distilbert, rt_dir, capsys):
    args = (f"model_name={tiny_distilbert}", f"dataset={rt_dir}", "max_train_samples=60", "max_eval_samples=20",
            "tensorboard=false", "run_name=cached")
    _, first = run(tmp_path, *args)
    entries = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 3                              # train, validation, test
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # a run killed mid-write by an older version
    entries[1].write_bytes(b"not a safetensors file")
    capsys.readouterr()
    _, second = run(tmp_path, *args)
    captured = capsys.readouterr()
    assert second["metrics"] == first["metrics"]
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: cache file")]
    assert len(warnings) == 2 and all(str(path) in "".join(warnings) for path in entries[:2])
    assert captured.out.count("reused cached features") == 1  # the undamaged entry
    assert sorted((tmp_path / "cache").iterdir()) == entries, "healed in place, no temporary files left"
    _, third = run(tmp_path, *args)
    assert capsys.readouterr().out.count("reused cached features") == 3 and third["metrics"] == first["metrics"]


def test_int8_runs_on_features_of_its_own(tmp_path, tiny_distilbert, rt_dir, capsys):
    """quantize=int8: the run completes on int8 Linear layers, its features are close to fp32's but not the
    same, and they go to cache entries of their own (never mixed with fp32 ones, reused by a second int8 run)."""
    import numpy as np
    import torch

    args = (f"model_name={tiny_distilbert}", f"dataset={rt_dir}", "max_train_samples=60", "max_eval_samples=20",
            "tensorboard=false")
    _, fp32 = run(tmp_path, *args)
    int8_dir, int8 = run(tmp_path, *args, "quantize=int8")
    assert "reused cached" not in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 6
    assert int8["model"]["quantize"] == "int8" and fp32["model"]["quantize"] is None
    assert int8["model"]["parameters"] == fp32["model"]["parameters"]
    assert json.loads((int8_dir / "classifiers" / "encoder.json").read_text())["quantize"] == "int8"
    run(tmp_path, *args, "quantize=int8")
    assert capsys.readouterr().out.count("reused cached features") == 3

    model, tokenizer = exercise_1.load_encoder(tiny_distilbert)
    quantized = exercise_1.quantize_encoder(model, "int8")
    kept = [m for m in quantized.modules() if type(m) is torch.nn.Linear]
    assert kept and all(m.in_features > m.out_features for m in kept), "only down-projections stay fp32"
    assert sum(type(m) is not torch.nn.Linear and "Linear" in type(m).__name__ for m in quantized.modules()) > len(kept)
    assert any(type(m) is torch.nn.Linear for m in model.modules()), "the fp32 model is left as it was"
    texts = [f"a film number {i} " * (1 + i % 5) for i in range(12)]
    ours, theirs = (exercise_1.extract_features(m, tokenizer, texts, "mean", batch_size=4) for m in (model, quantized))
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert not np.array_equal(ours, theirs) and cosine.min() > 0.9


def test_int8_is_refused_off_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "best_device", lambda: "cuda")
    with pytest.raises(utils.LabError, match="quantize=int8 runs on CPU only"):
        exercise_1.main(["quantize=int8", f"output_dir={tmp_path / 'runs'}", "dataset=/no/such/data"])
    assert not (tmp_path / "runs").exists()


def test_past_the_exact_svcs_size_auto_approximates_its_kernel_and_says_so(tmp_path, tiny_distilbert, rt_dir, capsys,
                                                                           monkeypatch):
    import numpy as np

    import predict

    config = utils.parse_config(exercise_1.CONFIG, [])
    assert exercise_1.svc_solver(config, 8530) == "exact"            # the course's size keeps today's SVC
    assert "note:" not in capsys.readouterr().out
    monkeypatch.setattr(exercise_1, "SVC_EXACT_MAX_ROWS", 100)       # 200 training texts stand for 60,000
    args = (f"model_name={tiny_distilbert}", f"dataset={rt_dir}", "max_train_samples=200", "max_eval_samples=60",
            "svc_components=50", "pooling=mean")
    run_dir, results = run(tmp_path, *args, "run_name=auto")
    assert "svc_solver=auto fits the SVC approximately" in capsys.readouterr().out
    assert results["classifiers"]["svc"]["solver"] == "approximate"
    assert results["classifiers"]["logreg"]["solver"] == "exact"
    svc, _ = saved_classifiers.load_fitted_classifier(run_dir, "svc")  # a Nystroem map and a linear SVM, from skops
    assert [type(step).__name__ for step in svc] == ["StandardScaler", "Nystroem", "LinearSVC"]
    assert svc[1].n_components == 50 and svc[1].gamma == pytest.approx(1 / 32, rel=1e-3)   # SVC's gamma="scale"
    rows = evaluate.read_predictions(run_dir / "predictions" / "svc_test.csv")[:5]
    ours = predict.main([str(run_dir), *(row["input"] for row in rows), "--stage", "svc"])
    assert [row["predicted"] for row in ours] == [row["predicted"] for row in rows]
    assert [row["score"] for row in ours] == pytest.approx([row["score"] for row in rows], abs=1e-5)
    exact = run(tmp_path, *args, "run_name=exact", "svc_solver=exact", "cache_features=true")[1]
    assert exact["classifiers"]["svc"]["solver"] == "exact"
    # the approximation tracks the exact fit: on these features both are near-chance-free, and close
    approximate, reference = (np.array([r["metrics"]["svc"][split]["accuracy"] for split in ("validation", "test")])
                              for r in (results, exact))
    assert np.abs(approximate - reference).max() <= 0.1


def test_logistic_regression_is_fit_in_float64_to_its_minimum():
    """Its score is a property of the features, not of the machine: fit_classifier hands lbfgs float64 features (in
    float32 its gradient rounded with BLAS's thread count, and the fit ended elsewhere) and runs it until it is at
    the loss's minimum, where a far tighter fit ends too; predict_scored scores float32 features as float64 ones."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64)).astype(np.float32)      # correlated features, as an encoder's are
    features = {split: rng.normal(size=(rows, 64)).astype(np.float32) @ mixing
                for split, rows in (("train", 600), ("validation", 200))}
    labels = {split: (array[:, :8].sum(1) + rng.normal(scale=2, size=len(array)) > 0).astype(int)
              for split, array in features.items()}
    classifier, _ = exercise_1.fit_classifier("logreg", utils.parse_config(exercise_1.CONFIG, []), features, labels)
    assert classifier[-1].coef_.dtype == np.float64
    minimum = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-12, max_iter=10_000))
    minimum.fit(features["train"].astype(np.float64), labels["train"])
    np.testing.assert_allclose(classifier[-1].coef_, minimum[-1].coef_, atol=1e-5)
    scored = exercise_1.predict_scored(classifier, features["validation"])
    for ours, wide in zip(scored, exercise_1.predict_scored(classifier, features["validation"].astype(np.float64))):
        np.testing.assert_array_equal(ours, wide)


def test_long_work_shows_its_start_elapsed_time_and_end(capsys):
    import time

    with utils.heartbeat("fit", estimate=12.0, every=0.05):
        time.sleep(0.18)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "fit: started (about 12 s)" and lines[-1].startswith("fit: done in 0.")
    assert len(lines) >= 4 and all(line.endswith("of about 12 s elapsed") for line in lines[1:-1])
    with utils.heartbeat("quiet", loud=False):
        pass
    assert capsys.readouterr().err == ""


def test_max_length_beyond_the_model_is_capped(tmp_path, tiny_distilbert, capsys):
    """The fixture has 256 positions and a tokenizer without a limit: 100000 used to index past them."""
    folder = write_csv_dataset(tmp_path / "topics", num_classes=2, per_class=20)
    train = folder / "train.csv"
    train.write_text(train.read_text() + ("goal " * 700).strip() + " today,sports\n")
    _, results = run(tmp_path, f"model_name={tiny_distilbert}", f"dataset={folder}", "text_column=sentence",
                     "label_column=topic", "max_length=100000", "tensorboard=false")
    assert "max_length=100000 is more than the model takes; using 256" in capsys.readouterr().err
    assert results["data_sizes"]["train"] == 41


def test_unseen_csv_with_four_string_classes(tmp_path, tiny_distilbert):
    folder = write_csv_dataset(tmp_path / "topics", num_classes=4, per_class=40)
    run_dir, results = run(tmp_path, f"model_name={tiny_distilbert}", f"dataset={folder}",
                           "text_column=sentence", "label_column=topic", "tune_C=true", "C_grid=0.1,1,10",
                           "pooling=mean")
    assert results["label_names"] == ["music", "politics", "science", "sports"]
    assert len(evaluate.read_confusion_matrices(run_dir)["svc"]["test"]) == 4
    assert results["classifiers"]["svc"]["C"] in (0.1, 1.0, 10.0)
    assert "politics" in results["classification_reports"]["logreg"]
    # the words carry the class, so even a random encoder's mean-pooled features separate the topics
    assert results["metrics"]["logreg"]["test"]["accuracy"] > 0.5


def test_a_vision_model_is_refused(tmp_path, rt_dir):
    from transformers import CLIPConfig

    folder = tmp_path / "clip"
    CLIPConfig().save_pretrained(folder)
    with pytest.raises(utils.LabError, match="vision.*text encoder"):
        run(tmp_path, f"model_name={folder}", f"dataset={rt_dir}", "max_train_samples=10", "max_eval_samples=10")


def test_hub_ids_offline_fail_with_the_offline_route(tmp_path, rt_dir):
    """With no Hub, the defaults stop at once (without the libraries' retries) and say what to do instead."""
    for args, name in (([], "cornell-movie-review-data/rotten_tomatoes"), ([f"dataset={rt_dir}"], "distilbert-base-uncased")):
        result = subprocess.run([sys.executable, "exercise_1.py", f"output_dir={tmp_path}", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert f"'{name}'" in result.stderr and "unreachable" in result.stderr and "README" in result.stderr
    assert not list(tmp_path.iterdir()), "no run folder for a run that never started"


@pytest.mark.slow
@pytest.mark.parametrize("pooling, floor", [("mean", 0.77), ("cls", 0.70)])
def test_real_minilm_on_full_rotten_tomatoes(tmp_path, minilm_path, rt_dir, pooling, floor):
    _, results = run(tmp_path, f"model_name={minilm_path}", f"dataset={rt_dir}", f"pooling={pooling}")
    print(json.dumps({stage: {split: round(v["accuracy"], 4) for split, v in splits.items()}
                      for stage, splits in results["metrics"].items()}), results["throughput_sentences_per_s"])
    assert results["metrics"]["svc"]["test"]["accuracy"] >= floor
    assert results["metrics"]["logreg"]["test"]["accuracy"] >= floor - 0.02
    # refitted on the run's cached features with BLAS on one thread and on two, logistic regression scores as
    # the run did: its numbers are the features', whatever the machine's thread count
    import numpy as np
    from safetensors import safe_open
    from threadpoolctl import threadpool_limits

    import data

    features = {}
    for path in (tmp_path / "cache").glob("features-*.safetensors"):
        with safe_open(str(path), framework="numpy") as entry:
            features[json.loads(entry.metadata()["key"])["split"]] = entry.get_tensor("features")
    splits = data.load_text_dataset(str(rt_dir), "text", "label", results["config"]["seed"])
    labels = {split: np.asarray(dataset["label"]) for split, dataset in splits.items()}
    for threads in (1, 2):
        with threadpool_limits(threads):
            classifier, _ = exercise_1.fit_classifier("logreg", results["config"], features, labels)
        for split in ("validation", "test"):
            accuracy = float((exercise_1.predict_scored(classifier, features[split])[0] == labels[split]).mean())
            assert accuracy == results["metrics"]["logreg"][split]["accuracy"], (threads, split)
