"""Exercise 1: how far do frozen transformer features plus a classic classifier go?

A pretrained encoder (DistilBERT by default) turns each movie review into one vector (the [CLS]
token or the mean over tokens); an SVC and a logistic-regression baseline learn sentiment from
those vectors. Nothing in the transformer is trained.

    python exercise_1.py                                   # Hub defaults (needs the Hub)
    python exercise_1.py model_name=<folder> dataset=<folder> pooling=mean
    python exercise_1.py --help                            # every key with its default
"""
from __future__ import annotations

import time

import numpy as np

import evaluate
import utils

CONFIG = {
    # what to run on: a Hub id or a local folder for each
    "model_name": "distilbert-base-uncased",
    "dataset": "cornell-movie-review-data/rotten_tomatoes",
    "text_column": "text",
    "label_column": "label",
    "max_train_samples": None,       # None = all; subsamples are stratified and seeded
    "max_eval_samples": None,
    # feature extraction
    "pooling": "cls",                # "cls" (first token, as the course asks) or "mean" (mask-aware)
    "max_length": 128,
    "batch_size": 64,
    "cache_features": True,          # reuse features from <output_dir>/cache when nothing changed
    # classifiers
    "standardize": True,             # z-score features before each classifier
    "svc_kernel": "rbf",
    "svc_C": 1.0,
    "logreg_C": 1.0,
    "logreg_max_iter": 2000,
    "tune_C": False,                 # pick each classifier's C from C_grid on the validation split
    "C_grid": [0.01, 0.1, 1.0, 10.0],
    # run bookkeeping and logging
    "output_dir": "runs",
    "run_name": None,                # None = exercise_1-<time>
    "overwrite": False,              # replace an existing run folder of the same name
    "seed": 42,
    "wandb_mode": "offline",         # "offline" | "online" | "disabled"
    "wandb_project": "transformer-labs",
    "tensorboard": True,
    "trust_remote_code": False,
}
CHOICES = {"pooling": ("cls", "mean"), "svc_kernel": ("linear", "poly", "rbf", "sigmoid"),
           "wandb_mode": ("offline", "online", "disabled")}
POSITIVE = ("max_train_samples", "max_eval_samples", "max_length", "batch_size", "svc_C", "logreg_C",
            "logreg_max_iter", "C_grid")


def load_encoder(model_name: str, trust_remote_code: bool = False):
    """A frozen text encoder and its tokenizer, from a Hub id or a local folder."""
    from transformers import AutoModel

    source, tokenizer = utils.text_model_source(model_name, "exercise 1", trust_remote_code)
    model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code, use_safetensors=None)
    return model.eval(), tokenizer


def make_classifier(kind: str, C: float, config: dict):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if kind == "svc":
        classifier = SVC(kernel=config["svc_kernel"], C=C, random_state=config["seed"])
    else:
        classifier = LogisticRegression(C=C, max_iter=config["logreg_max_iter"], random_state=config["seed"])
    return make_pipeline(StandardScaler(), classifier) if config["standardize"] else classifier


def fit_classifier(kind: str, config: dict, features: dict, labels: dict):
    """Fit one classifier on train; with tune_C, its C is the grid value best on validation."""
    grid = config["C_grid"] if config["tune_C"] else [config[f"{kind}_C"]]
    scores = {}
    best = None
    for C in grid:
        classifier = make_classifier(kind, C, config).fit(features["train"], labels["train"])
        scores[C] = float((classifier.predict(features["validation"]) == labels["validation"]).mean())
        if best is None or scores[C] > scores[best[0]]:
            best = (C, classifier)
    if len(grid) > 1:
        print(f"{kind}: validation accuracy by C {scores} -> C={best[0]}")
    return best[1], {"C": best[0], "validation_accuracy_by_C": {str(C): s for C, s in scores.items()}}


def main(argv: list[str] | None = None):
    # 1. config: defaults above, overridden by key=value arguments
    config = utils.parse_config(CONFIG, argv or [], CHOICES, POSITIVE, "exercise_1.py")
    utils.set_seed(config["seed"])
    timing = {}
    start = time.perf_counter()

    # 2. data: train / validation / test with text and integer labels
    with utils.timed(timing, "load_data"):
        data = utils.load_text_dataset(config["dataset"], config["text_column"], config["label_column"],
                                       config["seed"], config["max_train_samples"], config["max_eval_samples"])
    label_names = data["train"].features["label"].names
    print(f"data: {', '.join(f'{s} {len(d)}' for s, d in data.items())}; classes {label_names}")

    # 3. the frozen encoder; the run folder and loggers only once data and model are in hand
    with utils.timed(timing, "load_model"):
        model, tokenizer = load_encoder(config["model_name"], config["trust_remote_code"])
    device = utils.best_device()
    run_dir = utils.prepare_run_dir(config["output_dir"], config["run_name"], "exercise_1", config["overwrite"])
    loggers = utils.RunLoggers(run_dir, config, "exercise_1")

    # 4. one feature vector per text, cached on disk keyed by everything that changes it
    features, labels, throughput = {}, {}, {}
    model_key = utils.model_fingerprint(config["model_name"])
    with utils.timed(timing, "features"):
        for split, dataset in data.items():
            texts = dataset["text"]
            key = {"model": model_key, "texts": utils.texts_fingerprint(texts), "split": split,
                   "pooling": config["pooling"], "max_length": config["max_length"]}
            began = time.perf_counter()
            compute = lambda: utils.extract_features(model, tokenizer, texts, config["pooling"], config["max_length"],
                                                     config["batch_size"], device, desc=f"features {split}")
            if config["cache_features"]:
                features[split], hit = utils.cached_array(run_dir.parent / "cache", key, compute)
            else:
                features[split], hit = compute(), False
            if hit:
                print(f"features {split}: reused cached features {features[split].shape}")
            else:
                throughput[split] = round(len(texts) / (time.perf_counter() - began), 1)
            labels[split] = np.asarray(dataset["label"])
    if throughput:
        print(f"extraction throughput (sentences/s): {throughput}")

    # 5-6. the classifiers, each a stage evaluated on validation and test
    metrics, reports, matrices, chosen = {}, {}, {}, {}
    for stage in ("svc", "logreg"):
        with utils.timed(timing, stage):
            classifier, chosen[stage] = fit_classifier(stage, config, features, labels)
            metrics[stage], matrices[stage] = {}, {}
            for split in ("validation", "test"):
                predicted = classifier.predict(features[split])
                metrics[stage][split] = evaluate.classification_metrics(labels[split], predicted)
                matrices[stage][split] = evaluate.confusion(labels[split], predicted, len(label_names)).tolist()
            reports[stage] = evaluate.classification_report_text(labels["test"], predicted, label_names)
        figure = evaluate.plot_confusion_matrix(np.asarray(matrices[stage]["test"]), label_names,
                                                run_dir / f"confusion_{stage}_test.png", f"{stage} on test")
        loggers.log_figure(f"{stage}/confusion_test", figure)
        loggers.log_text(f"{stage}/classification_report_test", reports[stage])
        loggers.log_metrics(metrics[stage], prefix=f"{stage}.")
    timing["total"] = round(time.perf_counter() - start, 3)

    # 7. results file and summary
    model_info = {"name": config["model_name"], "parameters": utils.count_parameters(model)[1],
                  "hidden_size": int(features["train"].shape[1]), "pooling": config["pooling"]}
    evaluate.write_results(run_dir, "exercise_1", config, metrics, timing, model_info,
                           label_names=label_names, classifiers=chosen, confusion_matrices=matrices,
                           classification_reports=reports, throughput_sentences_per_s=throughput,
                           data_sizes={split: len(dataset) for split, dataset in data.items()})
    loggers.finish()
    print(f"\n{evaluate.results_table(metrics)}\n\nrun folder: {run_dir}")
    return run_dir


if __name__ == "__main__":
    utils.run_cli(main)
