"""Exercise 1 with quantize=int8 (dynamic int8 Linear layers) vs fp32: extraction speed and classifier accuracy.

Both sides extract features of the whole dataset (train, validation and test) with exercise 1's
extractor, the same encoder, pooling and max_length, in this process; `--repeats` rounds alternate
the two sides and the median round's fp32 seconds / int8 seconds is the speedup. Exercise 1's SVC and
logistic regression (its default config) are then fitted on each side's features. The accuracy drop
is the largest fp32 - int8 test accuracy over the two classifiers, in points; `feature_cosine` the
median cosine between a sentence's fp32 and int8 feature vectors.

    python -m bench.int8                          # real MiniLM, all of Rotten Tomatoes (minutes on a CPU)
    python -m bench.int8 --smoke --model <folder> # a few seconds, any small encoder
"""
from __future__ import annotations

import numpy as np

from bench import common

common.offline_env()
import data  # noqa: E402
import exercise_1  # noqa: E402
import hub  # noqa: E402
import utils  # noqa: E402

TARGETS = {"int8_speedup": 1.5, "accuracy_drop_points": 1.0}


def accuracies(config: dict, features: dict, labels: dict) -> dict:
    """Validation and test accuracy of exercise 1's two classifiers fitted on these features."""
    scores = {}
    for kind in ("svc", "logreg"):
        classifier, _ = exercise_1.fit_classifier(kind, config, features, labels)
        scores[kind] = {split: round(float((classifier.predict(features[split]) == labels[split]).mean()), 4)
                        for split in ("validation", "test")}
    return scores


def main() -> None:
    parser = common.parser(__doc__, "rotten_tomatoes")
    parser.add_argument("--pooling", default=exercise_1.CONFIG["pooling"], choices=("cls", "mean"))
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both sides, alternating; the median counts")
    args = common.parse_args(parser, "tiny run: 64 training and 32 evaluation sentences, one round", common.minilm)
    config = utils.parse_config(exercise_1.CONFIG, [f"pooling={args.pooling}"], exercise_1.CHOICES)
    repeats = 1 if args.smoke else args.repeats

    splits = data.load_text_dataset(args.dataset, seed=config["seed"], max_train_samples=64 if args.smoke else None,
                                    max_eval_samples=32 if args.smoke else None)
    texts = [text for split in splits.values() for text in split["text"]]
    ends = np.cumsum([len(split) for split in splits.values()])[:-1]
    labels = {name: np.asarray(split["label"]) for name, split in splits.items()}
    model, tokenizer = exercise_1.load_encoder(args.model)
    int8_model = exercise_1.quantize_encoder(model, "int8")  # a copy: model stays fp32
    max_length = hub.usable_max_length(config["max_length"], tokenizer, model.config)

    def extract(encoder):
        return lambda: exercise_1.extract_features(encoder, tokenizer, texts, config["pooling"], max_length,
                                                   config["eval_batch_size"], "cpu", desc="bench int8")

    for encoder in (model, int8_model):  # warm-up: thread pools, first allocations, quantized kernels
        exercise_1.extract_features(encoder, tokenizer, texts[:32], config["pooling"], max_length, 8, "cpu")
    rounds, fp32, int8 = common.paired_rounds(extract(model), extract(int8_model), repeats)
    speedup = common.median(r["ours_s"] / r["theirs_s"] for r in rounds)
    scores = {name: accuracies(config, dict(zip(splits, np.split(array, ends))), labels)
              for name, array in (("fp32", fp32), ("int8", int8))}
    drop = max(100 * (scores["fp32"][kind]["test"] - scores["int8"][kind]["test"]) for kind in ("svc", "logreg"))
    common.emit({
        "bench": "int8", "model": args.model, "sentences": len(texts),
        "splits": {name: len(split) for name, split in splits.items()}, "pooling": config["pooling"],
        "rounds": len(rounds),
        "fp32_sentences_per_s": round(common.median(len(texts) / r["ours_s"] for r in rounds), 1),
        "int8_sentences_per_s": round(common.median(len(texts) / r["theirs_s"] for r in rounds), 1),
        "int8_speedup": round(speedup, 2),
        "per_round": [{"fp32_s": round(r["ours_s"], 2), "int8_s": round(r["theirs_s"], 2),
                       "int8_speedup": round(r["ours_s"] / r["theirs_s"], 2)} for r in rounds],
        "feature_cosine": round(float(np.median(np.sum(fp32 * int8, 1) / np.linalg.norm(fp32, axis=1)
                                                / np.linalg.norm(int8, axis=1))), 4),
        "accuracy": scores,
        "accuracy_drop_points": round(drop, 2),
        "targets": TARGETS,
        "met": speedup >= TARGETS["int8_speedup"] and drop <= TARGETS["accuracy_drop_points"],
    }, args.results_file)


if __name__ == "__main__":
    main()
