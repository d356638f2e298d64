"""predict.py and the per-sample predictions files: a tiny run of each exercise, classified again by
`predict.py` from its own evaluation examples, must agree with what the run wrote for them; each run's
predictions files hold one row per evaluated example and give back results.json's metrics; and a
wrong folder, an unfinished run or a bad input ends in one line and exit code 2."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import evaluate
import exercise_1
import exercise_2
import exercise_3
import images
import predict
import report
import utils
from conftest import ROOT, read_results
from test_exercise_2 import tiny_args as tiny_args_2
from test_clip import write_truncated_jpeg
from test_exercise_3 import tiny_args as tiny_args_3
from tools import assets, build_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSIFICATION = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
                  "recall_weighted", "f1_weighted")


def check_predictions_files(run_dir: Path, dataset) -> dict:
    """Every (stage, split) in results.json has its predictions file, with one row per evaluated example,
    each row's id, input and true label are those of that row of `dataset` (the run's data, loaded again),
    and the metrics recomputed from it are results.json's. Returns {(stage, split): rows}."""
    results = read_results(run_dir)
    index = {name: i for i, name in enumerate(results["label_names"])}
    column = "image" if results["exercise"] == "exercise_3" else "text"
    files = {}
    for stage, splits in results["metrics"].items():
        for split, metrics in splits.items():
            rows = evaluate.read_predictions(run_dir / "predictions" / f"{stage}_{split}.csv")
            labels = [index[row["label"]] for row in rows]
            predicted = [index[row["predicted"]] for row in rows]
            matrices = evaluate.read_confusion_matrices(run_dir)
            evaluated = np.asarray(matrices[stage][split] if results["exercise"] != "exercise_3" else matrices[stage]).sum()
            assert len(rows) == evaluated == results["data_sizes"][split], (stage, split)
            assert len({row["id"] for row in rows}) == len(rows)
            inputs, labels_by_row = list(dataset[split][column]), list(dataset[split]["label"])
            assert [(row["input"], row["label"]) for row in rows] == \
                [(inputs[row["id"]], results["label_names"][labels_by_row[row["id"]]]) for row in rows]
            recomputed = evaluate.classification_metrics(labels, predicted)
            for name in CLASSIFICATION:
                assert recomputed[name] == pytest.approx(metrics[name], abs=1e-9), (stage, split, name)
            if "top5_accuracy" in metrics:
                top5 = np.mean([row["label"] in row["top5"].split("|") for row in rows])
                assert top5 == pytest.approx(metrics["top5_accuracy"])
            files[stage, split] = rows
    return files


def assert_agree(ours: list[dict], theirs: list[dict], top5: bool = False, score_abs: float = 1e-5) -> None:
    assert [row["input"] for row in ours] == [row["input"] for row in theirs]
    assert [row["predicted"] for row in ours] == [row["predicted"] for row in theirs]
    assert [row["score"] for row in ours] == pytest.approx([row["score"] for row in theirs], rel=1e-3, abs=score_abs)
    if top5:
        assert [row["top5"] for row in ours] == [row["top5"] for row in theirs]


@pytest.mark.parametrize("quantize", [None, "int8"])  # an int8 run's classifiers need int8 features again
def test_exercise_1_predict_agrees_with_the_run(tmp_path, tiny_distilbert, rt_dir, capsys, monkeypatch, quantize):
    # int8 quantizes activations with one scale per batch, so a text's features move a little with the texts
    # batched beside it: scores agree to ~1e-3, not to float rounding. On this tiny model fp32 features would
    # agree about as well, so the encoder predict extracts with is checked directly too.
    score_abs = 2e-3 if quantize else 1e-5
    extract, quantized = exercise_1.extract_features, []

    def spy(model, *args, **kwargs):
        quantized.append(any("quantized" in type(module).__module__ for module in model.modules()))
        return extract(model, *args, **kwargs)

    run_dir = exercise_1.main([f"model_name={tiny_distilbert}", f"dataset={rt_dir}", f"output_dir={tmp_path}",
                               "max_train_samples=200", "max_eval_samples=60", "eval_batch_size=16", "pooling=mean",
                               "wandb_mode=disabled", "tensorboard=false", "cache_features=false",
                               f"quantize={quantize}"])
    files = check_predictions_files(run_dir, data.load_text_dataset(str(rt_dir), seed=42, max_train_samples=200,
                                                                    max_eval_samples=60))
    assert {path.name for path in (run_dir / "classifiers").iterdir()} == {"svc.skops", "logreg.skops", "encoder.json"}
    monkeypatch.setattr(exercise_1, "extract_features", spy)
    for stage in ("svc", "logreg"):
        theirs = files[stage, "test"][:8]
        texts = tmp_path / "texts.txt"
        texts.write_text("\n".join(row["input"] for row in theirs) + "\n", encoding="utf-8")
        output = tmp_path / f"{stage}.csv"
        ours = predict.main([str(run_dir), str(texts), "--stage", stage, "--output", str(output)])
        assert_agree(ours, theirs, score_abs=score_abs)
        assert output.read_text().splitlines()[0] == "input,predicted,score,skipped"
    # sentences on the command line; the default stage is the one better on validation
    ours = predict.main([str(run_dir), *(row["input"] for row in files["svc", "validation"][:3])])
    metrics = read_results(run_dir)["metrics"]
    best = max(("svc", "logreg"), key=lambda stage: metrics[stage]["validation"]["accuracy"])
    assert_agree(ours, files[best, "validation"][:3], score_abs=score_abs)
    assert quantized == [quantize == "int8"] * 3
    assert f"stage {best}" in capsys.readouterr().out

    # REPORT.md lists the run's surest mistakes of that stage, read from the same file
    mistakes = report.confident_mistakes(report.load_runs(tmp_path)[0])
    wrong = sorted((row for row in files[best, "test"] if row["label"] != row["predicted"]),
                   key=lambda row: -row["score"])
    assert [row["id"] for row in mistakes] == [row["id"] for row in wrong[:3]] and len(mistakes) == 3
    section = "\n".join(report.mistakes_section(report.load_runs(tmp_path)))
    assert "## Most confident mistakes" in section and f"| {best} / test |" in section


@pytest.mark.parametrize("lora", [False, True])
def test_exercise_2_predict_agrees_with_the_run(tmp_path, tiny_distilbert, rt_dir, lora):
    run_dir = exercise_2.main(tiny_args_2(tiny_distilbert, rt_dir, tmp_path, max_steps=4, eval_steps=2,
                                          **{"lora.enabled": lora, "lora.r": 4, "lora.learning_rate": 1e-2}))
    files = check_predictions_files(run_dir, data.load_text_dataset(str(rt_dir), seed=0, max_train_samples=96,
                                                                    max_eval_samples=32))
    assert set(files) == {(stage, split) for stage in ("pretrained", "fine_tuned") for split in ("validation", "test")}
    before = [row["score"] for row in files["pretrained", "test"]]
    assert [row["score"] for row in files["fine_tuned", "test"]] != pytest.approx(before, abs=1e-3)
    theirs = files["fine_tuned", "test"][:10]
    table = tmp_path / "inputs.csv"
    import pandas as pd

    pd.DataFrame({"review": [row["input"] for row in theirs]}).to_csv(table, index=False)
    assert_agree(predict.main([str(run_dir), str(table), "--text-column", "review", "--batch-size", "3"]), theirs)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    return build_tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer_dir=str(clip_tokenizer_dir))


@pytest.mark.parametrize("lora", [True, False])
def test_exercise_3_predict_agrees_with_the_run(tmp_path, tiny_clip_dir, tiny_imagenet_dir, lora):
    # trained hard enough to change predictions, with adapter dropout on: the run's own evaluation must be the
    # deterministic one predict.py makes, row by row
    run_dir = exercise_3.main(tiny_args_3(tiny_clip_dir, tiny_imagenet_dir, tmp_path / "runs", prompts="ensemble",
                                          learning_rate=1e-3, max_steps=8, **{"lora.enabled": lora,
                                          "lora.learning_rate": 2e-2, "lora.dropout": 0.5}))
    dataset = images.load_image_dataset(str(tiny_imagenet_dir), seed=0, max_train_samples=32, max_eval_samples=16,
                                        max_classes=4)
    files = check_predictions_files(run_dir, dataset)
    trained = "lora" if lora else "fine_tuned"     # every weight trained: the whole model is in <run>/model
    assert set(files) >= {("zero_shot", "validation"), (trained, "validation")}
    before = {row["id"]: row["score"] for row in files["zero_shot", "validation"]}
    assert any(abs(row["score"] - before[row["id"]]) > 1e-3 for row in files[trained, "validation"]), \
        "training changed nothing: agreeing with the run would not show that predict loaded what it trained"
    first = {row["id"]: row["top5"] for row in files["zero_shot", "validation"]}
    assert sum(row["top5"] != first[row["id"]] for row in files[trained, "validation"]) >= 4, "too few rankings moved"
    theirs = files[trained, "validation"]
    folder = tmp_path / "photos"                 # a folder of images and a file given by itself
    folder.mkdir()
    for row in theirs[1:]:
        shutil.copy(row["input"], folder / Path(row["input"]).name)
    ours = predict.main([str(run_dir), theirs[0]["input"], str(folder)])
    copied = {Path(row["input"]).name: row for row in theirs[1:]}
    expected = [theirs[0], *(copied[Path(row["input"]).name] for row in ours[1:])]
    assert_agree(ours, [{**row, "input": mine["input"]} for row, mine in zip(expected, ours)], top5=True)
    with pytest.raises(utils.LabError, match="cut.jpg is not a readable image .*--strict"):  # else skipped: test_damaged_runs
        predict.main([str(run_dir), str(folder), str(write_truncated_jpeg(tmp_path / "cut.jpg")), "--strict"])
    zero_shot = files["zero_shot", "validation"][:4]
    assert_agree(predict.main([str(run_dir), *(row["input"] for row in zero_shot), "--stage", "zero_shot"]),
                 zero_shot, top5=True)
    halfway = files[f"{trained}_scale_0.5", "validation"][:4]       # the run's interpolation, from its saved weights
    assert_agree(predict.main([str(run_dir), *(row["input"] for row in halfway), "--scale", "0.5"]), halfway, top5=True)


def test_a_relative_model_folder_is_found_from_where_the_run_started(tmp_path, monkeypatch):
    (tmp_path / "project" / "models" / "enc").mkdir(parents=True)
    run_dir = tmp_path / "project" / "runs" / "sweep" / "point"
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = {"output_dir": "runs/sweep"}
    assert predict.model_source(run_dir, config, "models/enc") == str(tmp_path / "project" / "models" / "enc")
    assert predict.model_source(run_dir, config, "org/hub-id") == "org/hub-id"       # not a folder: a Hub id
    monkeypatch.chdir(tmp_path / "project")
    assert predict.model_source(run_dir, config, "models/enc") == "models/enc"        # found from here


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit code 2
# ---------------------------------------------------------------------------------------------

def run_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "LAB_SHARED_DIR": str(assets.shared_dir())})


def write_results(run_dir: Path, exercise: str, **extra) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_name": "m", "eval_batch_size": 8, "lora": {"enabled": exercise == "exercise_3"},
              **extra.pop("config", {})}
    (run_dir / "results.json").write_text(json.dumps({"exercise": exercise, "config": config, "metrics": {},
                                                      "label_names": ["neg", "pos"], **extra}))
    return run_dir


def test_wrong_folder_and_unfinished_runs_end_in_one_line(tmp_path):
    unfinished = tmp_path / "runs" / "exercise_2-cut"
    (unfinished / "checkpoint-3").mkdir(parents=True)
    write_results(tmp_path / "runs" / "done", "exercise_1")
    cases = {
        tmp_path / "nowhere": "run folder .* does not exist",
        unfinished: "has no results.json: the run did not finish",
        tmp_path / "runs": "has no results.json: it holds run folders \\(done\\); give one",
        write_results(tmp_path / "e1", "exercise_1"): "no saved svc classifier",
    }
    for folder, message in cases.items():
        finished = run_predict(folder, "good film")
        assert finished.returncode == 2, (folder, finished.stderr)
        assert "Traceback" not in finished.stderr and len(finished.stderr.strip().splitlines()) == 1, finished.stderr
        assert finished.stderr.startswith("error: ")
        assert re.search(message, finished.stderr), (message, finished.stderr)


def test_bad_flags_and_inputs_are_refused_before_any_model_loads(tmp_path, tiny_imagenet_dir):
    text_run = write_results(tmp_path / "e2", "exercise_2", best_checkpoint="checkpoint-1")
    image_run = write_results(tmp_path / "e3", "exercise_3")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    table = tmp_path / "reviews.csv"
    table.write_text("review\ngood\n")
    image = next((tiny_imagenet_dir / "val" / "images").iterdir())
    gone = write_results(tmp_path / "gone", "exercise_2", best_checkpoint=str(tmp_path / "moved" / "checkpoint-4"))
    lora_run = write_results(tmp_path / "lora", "exercise_2", config={"lora": {"enabled": True}})
    for args, message in (
            ((gone, "good"), "the best checkpoint of .* \\(checkpoint-4\\) is missing"),
            ((lora_run, "good"), "has no adapter/ .*the LoRA run did not finish"),
            ((write_results(tmp_path / "other", "exercise_7"), "good"), "from exercise_7; predict works with runs of"),
            ((text_run, "good", "--bogus"), "unrecognized arguments: --bogus"),
            ((text_run,), "the following arguments are required: inputs"),
            ((text_run, "good", "--stage", "svc"), "--stage svc: a run of exercise_2 predicts with fine_tuned"),
            ((text_run, "reviews.txt"), "input file reviews.txt does not exist"),
            ((text_run, latin), "latin.txt is not UTF-8 text"),
            ((text_run, table), "has no column 'text' .*set --text-column"),
            ((text_run, image), "is an image; this run classifies text"),
            ((text_run, "good", "--output", tmp_path / "no" / "out.csv"), "folder .* does not exist"),
            ((image_run, image), "has no adapter/ .*the run did not finish"),
            ((image_run, "a cat"), "'a cat' is not an image file or folder"),
            ((image_run, table), "is not an image file"),
            ((image_run, image, "--stage", "svc"), "predicts with lora or zero_shot")):
        with pytest.raises(utils.LabError, match=message):
            predict.main([str(arg) for arg in args])
    finished = run_predict(text_run, "good", "--bogus")
    assert finished.returncode == 2 and finished.stderr.count("\n") == 1 and "Traceback" not in finished.stderr
