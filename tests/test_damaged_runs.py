"""Damaged run folders and unreadable inputs. One real tiny run of each kind is made once; every case copies
its folder and damages one thing in the copy (missing, empty, cut short, of the wrong kind, a folder where a
file should be and the reverse, JSON that is not an object). Whatever predict.py, resume=True, report.py and
evaluate's readers load then ends in one line naming the file, what is wrong and what to do (report.py: a
warning, and the report is still written), never a traceback. predict.py over many inputs skips the
unreadable ones with one warning, marks them in --output, and stops on them with --strict."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cache
import evaluate
import exercise_1
import exercise_2
import exercise_3
import predict
import report
import utils
from conftest import ROOT, read_results
from test_clip import write_truncated_jpeg
from test_exercise_2 import tiny_args as tiny_args_2
from test_exercise_3 import tiny_args as tiny_args_3
from tools import assets, build_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What each damage makes of a file (or, "file", of a folder), and the words that say so
PROBLEMS = {"missing": "is missing", "empty": "is empty", "folder": "is a folder where a file should be",
            "file": "is a file where a folder should be", "list": "holds a JSON list, not an object",
            "zip": "is a zip archive but not a skops file"}
CUT = {".json": "is not valid JSON", ".safetensors": "is not a whole safetensors file",
       **{suffix: rf"is not a whole \{suffix} file" for suffix in (".skops", ".pt", ".pth")}}


def damage(path: Path, kind: str) -> str:
    """Damage `path` as a crash, a full disk or a wrong copy would; returns the words the message must hold."""
    data = path.read_bytes() if path.is_file() else b""
    if kind.startswith(("drop:", "set:")):         # a JSON object without one key, or with it of the wrong type
        contents, key = json.loads(data), kind.split(":")[1]
        if kind.startswith("drop:"):
            del contents[key]
        else:
            contents[key] = [1]
        path.write_text(json.dumps(contents))
        return f"has no '{key}'" if kind.startswith("drop:") else rf"'{key}' should be a JSON object, found \[1\]"
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    if kind == "folder":
        path.mkdir()
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("data.pkl", b"not a skops file")
    elif kind != "missing":
        path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "text": b"not what was saved here\n",
                          "list": b"[1, 2]", "file": b"a file where a folder was\n"}[kind])
    return PROBLEMS.get(kind) or CUT[path.suffix]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_distilbert, rt_dir, clip_tokenizer_dir, tiny_imagenet_dir):
    """{run name: the args that made it} for real tiny runs in one runs folder, made once: exercise 1; exercise 2
    with checkpoint-2 and checkpoint-4, and with LoRA; exercise 3 with LoRA (checkpoints 2 and 4) and without."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("built")
    clip_dir = build_tiny_clip.build_tiny_clip(root / "tiny-clip", tokenizer_dir=str(clip_tokenizer_dir))
    runs = root / "runs"
    args = {
        "e1": [f"model_name={tiny_distilbert}", f"dataset={rt_dir}", f"output_dir={runs}", "run_name=e1",
               "max_train_samples=100", "max_eval_samples=40", "eval_batch_size=16", "pooling=mean",
               "wandb_mode=disabled", "tensorboard=false", "cache_features=false"],
        "e2": tiny_args_2(tiny_distilbert, rt_dir, runs, run_name="e2", max_steps=4, eval_steps=2),
        "e2-lora": tiny_args_2(tiny_distilbert, rt_dir, runs, run_name="e2-lora", max_steps=2, eval_steps=2,
                               **{"lora.enabled": True, "lora.r": 4}),
        "e3": tiny_args_3(clip_dir, tiny_imagenet_dir, runs, run_name="e3", max_steps=4, save_steps=2),
        "e3-full": tiny_args_3(clip_dir, tiny_imagenet_dir, runs, run_name="e3-full", max_steps=2,
                               **{"lora.enabled": False}),
    }
    for name, argv in args.items():
        {"e1": exercise_1, "e2": exercise_2, "e3": exercise_3}[name[:2]].main(argv)
    torch.set_num_threads(threads)
    return {"runs": runs, "args": args}


def copy_run(built, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built["runs"] / name, tmp_path / "runs" / name, symlinks=True))


def one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in message, message
    return message


def image(tiny_imagenet_dir, index: int = 0) -> Path:
    return sorted((tiny_imagenet_dir / "val" / "images").iterdir())[index]


# ---------------------------------------------------------------------------------------------
# predict.py: what it loads from a finished run
# ---------------------------------------------------------------------------------------------

BEST = "<best checkpoint>"      # exercise 2's, named in its results.json
PREDICT_CASES = [
    *[("e1", "classifiers/svc.skops", kind) for kind in ("missing", "empty", "truncated", "text", "folder", "zip")],
    *[("e1", "classifiers/encoder.json", kind) for kind in ("missing", "empty", "truncated", "list", "folder",
                                                            "drop:pooling")],
    ("e1", "classifiers", "file"),
    *[("e2", f"{BEST}/model.safetensors", kind) for kind in ("missing", "empty", "truncated", "text", "folder")],
    *[("e2", f"{BEST}/config.json", kind) for kind in ("missing", "truncated", "list", "folder")],
    ("e2", f"{BEST}/tokenizer.json", "truncated"), ("e2", BEST, "file"),
    *[("e2", "results.json", kind) for kind in ("empty", "truncated", "list", "folder", "drop:label_names",
                                                "set:config")],
    *[("e2-lora", "adapter/adapter_model.safetensors", kind) for kind in ("missing", "empty", "truncated", "text",
                                                                          "folder")],
    *[("e2-lora", "adapter/adapter_config.json", kind) for kind in ("missing", "empty", "truncated", "list", "folder")],
    ("e2-lora", "adapter", "file"),
    *[("e3", "adapter/adapter_model.safetensors", kind) for kind in ("truncated", "text")],
    ("e3", "adapter/adapter_config.json", "list"), ("e3", "adapter", "file"),
    *[("e3-full", "model/model.safetensors", kind) for kind in ("missing", "truncated", "text", "folder")],
    *[("e3-full", "model/config.json", kind) for kind in ("empty", "list")], ("e3-full", "model", "file"),
]


def damaged_path(run_dir: Path, relative: str) -> Path:
    best = Path(read_results(run_dir)["best_checkpoint"]).name if BEST in relative else ""
    return run_dir / relative.replace(BEST, best)


@pytest.mark.parametrize("run, relative, kind", PREDICT_CASES)
def test_predict_names_a_damaged_file_of_the_run(built, tmp_path, tiny_imagenet_dir, run, relative, kind):
    run_dir = copy_run(built, run, tmp_path)
    path = damaged_path(run_dir, relative)
    problem = damage(path, kind)
    given = str(image(tiny_imagenet_dir)) if run.startswith("e3") else "a gripping film"
    with pytest.raises(utils.LabError) as error:
        predict.main([str(run_dir), given])
    remedy = ("rerun the exercise that made the run" if relative == "results.json" else
              f"rerun exercise_{run[1]}.py with the settings in {re.escape(str(run_dir / 'results.json'))}")
    assert re.match(rf"{re.escape(str(path))}:? {problem}.*; {remedy}", one_line(error)), str(error.value)


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LAB_SHARED_DIR": str(assets.shared_dir())})


def assert_one_error_line(finished: subprocess.CompletedProcess, pattern: str) -> None:
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr and finished.stderr.startswith("error: "), finished.stderr[-3000:]
    assert finished.stderr.count("\n") == 1 and re.search(pattern, finished.stderr), finished.stderr


def test_predict_command_on_damaged_runs_exits_2_with_one_line(built, tmp_path):
    e1, lora = copy_run(built, "e1", tmp_path), copy_run(built, "e2-lora", tmp_path)
    damage(e1 / "classifiers" / "svc.skops", "truncated")       # was: zipfile.BadZipFile
    damage(lora / "adapter" / "adapter_model.safetensors", "text")
    assert_one_error_line(run_script("predict.py", e1, "a film", "--stage", "svc"), r"svc\.skops is not a whole")
    assert_one_error_line(run_script("predict.py", lora, "a film"), r"adapter_model\.safetensors is not a whole")


# ---------------------------------------------------------------------------------------------
# resume=True: the newest checkpoint, and the settings it was trained with
# ---------------------------------------------------------------------------------------------

RESUME_CASES = [
    *[("trainer_state.json", kind) for kind in ("missing", "empty", "truncated", "list", "folder")],
    *[("model.safetensors", kind) for kind in ("missing", "truncated", "text", "folder")],
    *[("optimizer.pt", kind) for kind in ("missing", "empty", "truncated", "text", "folder")],
    *[("scheduler.pt", kind) for kind in ("missing", "truncated")],
    *[("rng_state.pth", kind) for kind in ("missing", "truncated")],
    ("", "file"),                                   # the checkpoint folder itself
]


def resume_args(built, name: str, tmp_path: Path) -> list[str]:
    """The args that made run `name`, for its copy under tmp_path/runs, plus resume=True."""
    args = [arg for arg in built["args"][name] if not arg.startswith("output_dir=")]
    return [*args, f"output_dir={tmp_path / 'runs'}", "resume=True"]


@pytest.mark.parametrize("name, kind", RESUME_CASES)
def test_resume_refuses_a_damaged_newest_checkpoint_naming_the_one_before(built, tmp_path, name, kind):
    run_dir = copy_run(built, "e2", tmp_path)
    newest = run_dir / "checkpoint-4"
    problem = damage(newest / name if name else newest, kind)
    with pytest.raises(utils.LabError) as error:        # before any data or model is loaded
        exercise_2.main(resume_args(built, "e2", tmp_path))
    what = f"{re.escape(name)} {problem}" if name else f"it {problem}"
    assert re.fullmatch(rf"resume=True: the newest checkpoint {re.escape(str(newest))} is damaged: {what}.*; delete "
                        rf"checkpoint-4 and rerun with resume=True to continue from checkpoint-2, the newest whole "
                        rf"checkpoint before it", one_line(error)), str(error.value)


def test_following_the_advice_resumes_from_the_checkpoint_before(built, tmp_path):
    run_dir = copy_run(built, "e2", tmp_path)
    damage(run_dir / "checkpoint-4" / "optimizer.pt", "truncated")
    with pytest.raises(utils.LabError, match="delete checkpoint-4 and rerun"):
        exercise_2.main(resume_args(built, "e2", tmp_path))
    shutil.rmtree(run_dir / "checkpoint-4")
    results = read_results(exercise_2.main(resume_args(built, "e2", tmp_path)))
    assert results["training"]["resumed_from"].endswith("checkpoint-2") and results["training"]["global_step"] == 4


def test_resume_with_no_whole_checkpoint_says_so(built, tmp_path):
    run_dir = copy_run(built, "e2", tmp_path)
    damage(run_dir / "checkpoint-4" / "optimizer.pt", "truncated")
    damage(run_dir / "checkpoint-2" / "trainer_state.json", "missing")      # killed while saving
    with pytest.raises(utils.LabError, match="no earlier checkpoint is whole: start the run afresh with "
                                             "overwrite=True instead of resume=True"):
        exercise_2.main(resume_args(built, "e2", tmp_path))


@pytest.mark.parametrize("name, kind", [("adapter_model.safetensors", "truncated"), ("adapter_config.json", "list"),
                                        ("adapter_model.safetensors", "missing")])
def test_resume_of_a_lora_run_checks_the_adapter_in_its_checkpoint(built, tmp_path, name, kind):
    run_dir = copy_run(built, "e3", tmp_path)
    newest = run_dir / "checkpoints" / "checkpoint-4"
    problem = damage(newest / name, kind)
    with pytest.raises(utils.LabError) as error:
        exercise_3.main(resume_args(built, "e3", tmp_path))
    assert re.search(rf"{re.escape(str(newest))} is damaged: {re.escape(name)} {problem}.*continue from checkpoint-2",
                     one_line(error)), str(error.value)


@pytest.mark.parametrize("kind", ["empty", "truncated", "list", "folder"])
def test_resume_names_a_damaged_run_config(built, tmp_path, kind):
    run_dir = copy_run(built, "e2", tmp_path)
    problem = damage(run_dir / "run_config.json", kind)        # a list: was AttributeError in utils.flatten
    with pytest.raises(utils.LabError) as error:
        exercise_2.main(resume_args(built, "e2", tmp_path))
    assert re.match(rf"{re.escape(str(run_dir / 'run_config.json'))} {problem}.*; it records the settings the "
                    rf"checkpoints were trained with: delete it to resume without checking them", one_line(error))


def test_resume_command_with_a_damaged_checkpoint_exits_2_with_one_line(built, tmp_path):
    run_dir = copy_run(built, "e2", tmp_path)
    damage(run_dir / "checkpoint-4" / "optimizer.pt", "truncated")
    assert_one_error_line(run_script("exercise_2.py", *resume_args(built, "e2", tmp_path)),
                          r"checkpoint-4 is damaged: optimizer\.pt is not a whole \.pt file.*from checkpoint-2")


# ---------------------------------------------------------------------------------------------
# report.py and evaluate's readers
# ---------------------------------------------------------------------------------------------

def cut_mid_row(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:len(lines) // 2]) + lines[len(lines) // 2][:2], encoding="utf-8")


CSV_DAMAGE = {
    "cut mid-row": (cut_mid_row, r"line \d+ is not a prediction \(id '\d+', score None\): cut short"),
    "not UTF-8": (lambda path: path.write_bytes(b"\xff\xfe" + path.read_bytes()), "is not UTF-8 text"),
    "empty": (lambda path: damage(path, "empty"), "is empty"),
    "folder": (lambda path: damage(path, "folder"), "is a folder where a file should be"),
    "no score column": (lambda path: path.write_text(path.read_text().replace(",score", ",confidence", 1)),
                        "has no column 'score'"),
}


@pytest.mark.parametrize("how", CSV_DAMAGE)
def test_report_warns_about_a_damaged_predictions_file_and_still_writes(built, tmp_path, capsys, how):
    run_dir = copy_run(built, "e1", tmp_path)
    breaks, message = CSV_DAMAGE[how]
    for path in sorted((run_dir / "predictions").iterdir()):
        breaks(path)
    text = report.write_report(tmp_path / "runs", tensorboard=False).read_text()
    assert "| e1 |" in text and "## Most confident mistakes" not in text    # the run's scores, not its mistakes
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and re.match(rf"warning: {re.escape(str(run_dir / 'predictions'))}/\w+\.csv {message}.*"
                                           rf"; the report leaves out the mistakes of e1$", warnings[0]), warnings


@pytest.mark.parametrize("kind", ["empty", "folder"])
def test_report_warns_about_a_damaged_results_file_and_says_what_to_do(built, tmp_path, capsys, kind):
    run_dir = copy_run(built, "e1", tmp_path)
    damage(run_dir / "results.json", kind)
    assert "0 runs" in report.write_report(tmp_path / "runs", tensorboard=False).read_text()
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: skipping {run_dir / 'results.json'}: ") and "\n" not in warning
    assert warning.endswith("the report leaves it out (rerun what wrote it, or delete it)")


def test_report_command_on_a_damaged_predictions_file_warns_in_one_line(built, tmp_path):
    run_dir = copy_run(built, "e1", tmp_path)
    for path in (run_dir / "predictions").iterdir():
        cut_mid_row(path)                               # was: TypeError from float(None)
    finished = run_script("report.py", tmp_path / "runs", "--no-tensorboard")
    assert finished.returncode == 0 and "Traceback" not in finished.stderr, finished.stderr[-3000:]
    warnings = [line for line in finished.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "is not a prediction" in warnings[0], finished.stderr[-3000:]


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "list", "folder"])
def test_reading_damaged_confusion_matrices_names_the_file(built, tmp_path, kind):
    run_dir = copy_run(built, "e2", tmp_path)
    problem = damage(run_dir / evaluate.CONFUSION_FILE, kind)
    with pytest.raises(utils.LabError) as error:
        evaluate.read_confusion_matrices(run_dir)
    assert re.match(rf"{re.escape(str(run_dir / evaluate.CONFUSION_FILE))} {problem}.*; rerun the exercise",
                    one_line(error))


def test_a_folder_in_place_of_a_cache_entry_is_removed_and_computed_again(tmp_path, capsys):
    # truncated, overwritten and empty entries: tests/test_features.py
    compute = lambda: np.ones((3, 2), dtype=np.float32)
    cache.cached_array(tmp_path, {"k": 1}, compute, rows=3, dtype=np.float32)
    path = next(tmp_path.glob("features-*.safetensors"))
    damage(path, "folder")
    (path / "inside").write_text("x")
    array, hit = cache.cached_array(tmp_path, {"k": 1}, compute, rows=3, dtype=np.float32)   # was: IsADirectoryError
    assert not hit and array.shape == (3, 2) and path.is_file()
    assert capsys.readouterr().err.startswith(f"warning: cache file {path} is unusable")
    assert cache.cached_array(tmp_path, {"k": 1}, compute, rows=3, dtype=np.float32)[1]


# ---------------------------------------------------------------------------------------------
# predict.py over many inputs, some unreadable
# ---------------------------------------------------------------------------------------------

def unreadable_warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]


def test_unreadable_text_files_are_skipped_with_one_warning_and_marked(built, tmp_path, capsys):
    run_dir = built["runs"] / "e1"
    good, latin, empty, blank, broken = (tmp_path / name for name in ("good.txt", "latin.txt", "empty.txt",
                                                                      "blank.txt", "broken.csv"))
    good.write_text("a gripping, funny film\ndull and far too long\n")
    latin.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    empty.write_bytes(b"")
    blank.write_text("\n  \n")
    broken.write_text("text\ngood\na,b,c\n")
    output = tmp_path / "out.csv"
    alone = predict.main([str(run_dir), "a fine film", str(good)])
    capsys.readouterr()
    rows = predict.main([str(run_dir), "a fine film", str(latin), str(good), str(empty), str(broken), str(blank),
                         "--output", str(output)])
    assert [row["input"] for row in rows] == ["a fine film", str(latin), "a gripping, funny film",
                                              "dull and far too long", str(empty), str(broken), str(blank)]
    classified = [row for row in rows if not row["skipped"]]
    assert [(row["predicted"], row["score"]) for row in classified] == \
        [(row["predicted"], row["score"]) for row in alone]
    assert {row["input"]: row["skipped"] for row in rows if row["skipped"]} == {
        str(latin): "not UTF-8 text (invalid continuation byte at byte 3)", str(empty): "empty",
        str(broken): "not readable (Error tokenizing data. C error: Expected 1 fields in line 3, saw 3)",
        str(blank): "empty"}
    warnings = unreadable_warnings(capsys)
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipped 4 unreadable inputs (3 classified): "
                                                         f"{latin} is not UTF-8 text")
    assert f"{empty} is empty" in warnings[0] and "; and 1 more; marked in the skipped column of" in warnings[0]
    with open(output, newline="", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert list(written[0]) == ["input", "predicted", "score", "skipped"]
    assert [(row["input"], row["predicted"], row["skipped"]) for row in written] == \
        [(row["input"], row["predicted"], row["skipped"]) for row in rows]
    assert all(row["score"] == "" for row in written if row["skipped"])
    import pandas as pd

    frame = pd.read_csv(output)
    assert frame["skipped"].isna().sum() == 3 and frame["score"].notna().sum() == 3

    with pytest.raises(utils.LabError) as error:
        predict.main([str(run_dir), str(good), str(latin), str(empty), "--strict"])
    assert one_line(error).startswith(f"{latin} is not UTF-8 text (invalid continuation byte at byte 3); --strict")


def test_when_no_text_input_can_be_read_it_is_one_error_before_any_model_loads(built, tmp_path, monkeypatch):
    latin, empty = tmp_path / "latin.txt", tmp_path / "empty.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    empty.write_bytes(b"")
    monkeypatch.setitem(predict.PREDICTORS, "exercise_1", None)     # nothing may be loaded
    with pytest.raises(utils.LabError) as error:
        predict.main([str(built["runs"] / "e1"), str(latin), str(empty)])
    assert one_line(error) == (f"no input can be read, nothing to classify: {latin} is not UTF-8 text (invalid "
                               f"continuation byte at byte 3); {empty} is empty; fix or replace them")
    with pytest.raises(utils.LabError) as error:
        predict.main([str(built["runs"] / "e1"), str(empty)])
    assert one_line(error) == f"the input cannot be read, nothing to classify: {empty} is empty; fix or replace it"
    finished = run_script("predict.py", built["runs"] / "e1", latin, empty)
    assert_one_error_line(finished, "no input can be read, nothing to classify")


def test_unreadable_images_are_skipped_with_one_warning_and_marked(built, tmp_path, capsys, tiny_imagenet_dir):
    run_dir, photos = built["runs"] / "e3", tmp_path / "photos"
    photos.mkdir()
    shutil.copy(image(tiny_imagenet_dir, 0), photos / "1.JPEG")
    write_truncated_jpeg(photos / "2-cut.jpg")
    (photos / "3-empty.jpg").write_bytes(b"")
    (photos / "4-text.png").write_text("not an image\n")   # --batch-size 2: the second batch has no readable image
    shutil.copy(image(tiny_imagenet_dir, 1), photos / "5.JPEG")
    output = tmp_path / "out.csv"
    alone = predict.main([str(run_dir), str(photos / "1.JPEG"), str(photos / "5.JPEG")])
    capsys.readouterr()
    rows = predict.main([str(run_dir), str(photos), "--batch-size", "2", "--output", str(output)])
    assert [Path(row["input"]).name for row in rows] == ["1.JPEG", "2-cut.jpg", "3-empty.jpg", "4-text.png", "5.JPEG"]
    classified = [row for row in rows if not row["skipped"]]
    assert [row["top5"] for row in classified] == [row["top5"] for row in alone]
    assert [row["score"] for row in classified] == pytest.approx([row["score"] for row in alone], rel=1e-5)
    reasons = [row["skipped"] for row in rows]
    assert reasons[0] == reasons[4] == "" and reasons[2] == "empty"
    assert reasons[1].startswith("not a readable image (image file is truncated")
    assert reasons[3].startswith("not a readable image (cannot identify image file")
    warnings = unreadable_warnings(capsys)
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipped 3 unreadable inputs (2 classified): "
                                                         f"{photos / '2-cut.jpg'} is not a readable image")
    with open(output, newline="", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert list(written[0]) == ["input", "predicted", "score", "top5", "skipped"]
    assert [(row["predicted"], row["top5"], row["score"]) for row in written if row["skipped"]] == [("", "", "")] * 3

    with pytest.raises(utils.LabError) as error:
        predict.main([str(run_dir), str(photos), "--strict"])
    assert one_line(error).startswith(f"{photos / '2-cut.jpg'} is not a readable image (image file is truncated")
    for name in ("1.JPEG", "5.JPEG"):
        (photos / name).unlink()
    with pytest.raises(utils.LabError) as error:
        predict.main([str(run_dir), str(photos)])
    assert one_line(error).startswith(f"no input can be read, nothing to classify: {photos / '2-cut.jpg'} is not a "
                                      f"readable image") and one_line(error).endswith("fix or replace them")
