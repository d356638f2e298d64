"""Exercise 1's fitted classifiers on disk: skops files (never pickle), and what makes the features they expect.

exercise_1.py saves them in `<run>/classifiers`; predict.py loads them, refusing a file that holds types
outside TRUSTED_TYPES without loading it, and naming a damaged one (artifacts.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import artifacts
import faults
import utils

CLASSIFIER_DIR = "classifiers"      # <run>/classifiers/<stage>.skops and encoder.json
# every type a saved classifier may contain; loading refuses a file holding any other
TRUSTED_TYPES = ["sklearn.pipeline.Pipeline", "sklearn.preprocessing._data.StandardScaler",
                 "sklearn.svm._classes.SVC", "sklearn.linear_model._logistic.LogisticRegression",
                 "sklearn.kernel_approximation.Nystroem", "sklearn.svm._classes.LinearSVC"]


def save_fitted_classifiers(run_dir: Path, fitted: dict, config: dict, label_names: list[str]) -> None:
    """Each fitted classifier of `fitted` ({stage: classifier}) as `<stage>.skops`, and `encoder.json`: the encoder,
    pooling and max_length that make the features it expects, and the class names of its ids. Each file is written
    whole."""
    import skops.io

    folder = faults.make_folder(Path(run_dir) / CLASSIFIER_DIR)
    for stage, classifier in fitted.items():
        utils.write_atomic(folder / f"{stage}.skops", skops.io.dumps(classifier))
    encoder = {key: config[key] for key in ("model_name", "pooling", "max_length", "trust_remote_code", "quantize",
                                            "mixed_precision")}
    utils.write_atomic(folder / "encoder.json", json.dumps({**encoder, "label_names": label_names}, indent=2).encode())


def load_fitted_classifier(run_dir: Path, stage: str):
    """(classifier, encoder.json's dict) as save_fitted_classifiers saved them for `stage`."""
    folder = Path(run_dir) / CLASSIFIER_DIR
    path, info = folder / f"{stage}.skops", folder / "encoder.json"
    if not folder.exists():
        raise utils.LabError(f"{run_dir} has no saved {stage} classifier ({path.name} and encoder.json in "
                             f"{folder}): an unfinished run, or one from before classifiers were saved")
    remedy = f"rerun exercise_1.py with the settings in {run_dir}/results.json to save the classifiers again"
    artifacts.check_folder(folder, [path.name, info.name], remedy)
    encoder = artifacts.read_json(info, remedy, {"model_name": str, "pooling": str, "max_length": int,
                                                 "label_names": list})
    import skops.io

    untrusted = [name for name in skops.io.get_untrusted_types(file=path) if name not in TRUSTED_TYPES]
    if untrusted:
        raise utils.LabError(f"{path} holds types predict does not load: {untrusted}")
    return skops.io.load(path, trusted=TRUSTED_TYPES), encoder
