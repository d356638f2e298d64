"""Exercise 3's linear probe against size: probe.probe_stages (every `probe_shots` entry, the `probe_C` sweep, the
default config) on features of ViT-B/16's pre-projection width (768) for Tiny ImageNet's 200 classes, at the train
images per class that the shared assets hold (50) and at the full release's (500).

The features are synthetic, seeded: a class mean plus Gaussian noise per image, standardised as the probe sees them.
Real CLIP features may need more lbfgs iterations than these; what this measures is how the stage's cost grows
with the number of train rows. `seconds_per_row_growth` is the full
size's seconds per train row over the small size's: about 1 is linear in rows, the goal is at most 2. Both sizes
run in this process, one after the other.

    python -m bench.probe                    # 10,000 and 100,000 train rows (minutes on 2 cores)
    python -m bench.probe --smoke            # a few seconds: 10 classes of width 32
"""
from __future__ import annotations

import time

import numpy as np

from bench import common

common.offline_env()
import exercise_3  # noqa: E402
import probe  # noqa: E402

TARGETS = {"seconds_per_row_growth": 2.0}
SEPARATION = 0.15       # class means' scale against unit noise: the full size's probe lands near 0.85 accuracy


def synthetic(classes: int, per_class: int, width: int, means: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(classes), per_class)
    features = SEPARATION * means[labels] + rng.standard_normal((len(labels), width))
    return features.astype(np.float32), labels


def timed_probes(classes: int, per_class: int, width: int, config: dict) -> dict:
    rng = np.random.default_rng(0)
    means = rng.standard_normal((classes, width))
    train, train_labels = synthetic(classes, per_class, width, means, rng)
    validation, validation_labels = synthetic(classes, 50, width, means, rng)
    start = time.perf_counter()
    results, fitted, seconds = probe.probe_stages(train, train_labels, validation, validation_labels,
                                                  [str(c) for c in range(classes)], config)
    return {"train_rows": len(train), "seconds": round(time.perf_counter() - start, 2), "stage_seconds": seconds,
            "accuracy": {stage: round(result.metrics["accuracy"], 4) for stage, result in results.items()},
            "C": {stage: fit["C"] for stage, fit in fitted.items()}}


def main() -> None:
    parser = common.parser(__doc__, "tiny-imagenet-200", model_help="unused: the features are synthetic")
    args = common.parse_args(parser, "10 classes of width 32, at 20 and 200 train images per class")
    classes, width, sizes = (10, 32, (20, 200)) if args.smoke else (200, 768, (50, 500))
    config = dict(exercise_3.CONFIG)
    probe.make_probe(1.0, 1, 0)     # imports scikit-learn before either size's clock starts
    small, full = (timed_probes(classes, per_class, width, config) for per_class in sizes)
    growth = (full["seconds"] / full["train_rows"]) / (small["seconds"] / small["train_rows"])
    result = {"bench": "probe", "model": "synthetic features", "classes": classes, "width": width, "probe_shots": config["probe_shots"],
              "probe_C": config["probe_C"], "small": small, "full": full,
              "seconds_per_row_growth": common.significant(growth), "targets": TARGETS, "ceilings": list(TARGETS)}
    result["met"] = result["seconds_per_row_growth"] <= TARGETS["seconds_per_row_growth"]
    common.emit(result, args.results_file)


if __name__ == "__main__":
    main()
