"""The results report (`python report.py <folder>`) from hand-made results files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import report

ROOT = Path(__file__).resolve().parent.parent


def write_run(folder: Path, name: str, exercise: str, metrics: dict, timing: dict, model: dict,
              config: dict | None = None, **extra) -> None:
    run_dir = folder / name
    run_dir.mkdir(parents=True)
    config = {"dataset": "/data/rotten_tomatoes", **(config or {})}
    results = {"exercise": exercise, "config": config, "metrics": metrics, "timing": timing, "model": model,
               "environment": {"device": "cpu"}, **extra}
    (run_dir / "results.json").write_text(json.dumps(results))


def scores(accuracy: float, f1: float | None = None) -> dict:
    return {"accuracy": accuracy, "f1_macro": accuracy - 0.01 if f1 is None else f1, "precision_macro": 0.0}


@pytest.fixture
def runs(tmp_path) -> Path:
    folder = tmp_path / "runs"
    write_run(folder, "e1", "exercise_1",
              {"svc": {"validation": scores(0.78), "test": scores(0.77)},
               "logreg": {"validation": scores(0.76), "test": scores(0.775)}},
              {"features": 50.0, "svc": 19.94, "logreg": 0.5, "total": 80.0},
              {"name": "/models/minilm/model", "parameters": 22713216})
    write_run(folder, "e2-full", "exercise_2",
              {"pretrained": {"validation": scores(0.50), "test": scores(0.49)},
               "fine_tuned": {"validation": scores(0.85), "test": scores(0.84)}},
              {"pretrained": 3.0, "train": 100.0, "evaluate": 5.0, "total": 120.0},
              {"name": "/models/minilm/model", "parameters": 22714000, "trainable_parameters": 22714000},
              config={"lora": {"enabled": False}}, memory={"peak_rss_mb": 1234.5})
    # best on test but worse on validation: the comparison must not pick it
    write_run(folder, "e2-lucky", "exercise_2",
              {"fine_tuned": {"validation": scores(0.70), "test": scores(0.95)}},
              {"train": 10.0, "evaluate": 1.0, "total": 12.0},
              {"name": "/models/minilm/model", "parameters": 22714000, "trainable_parameters": 22714000},
              config={"lora": {"enabled": False}})
    write_run(folder, "sub/e2-lora", "exercise_2",
              {"pretrained": {"validation": scores(0.50), "test": scores(0.48)},
               "fine_tuned": {"validation": scores(0.80), "test": scores(0.79)}},
              {"pretrained": 3.0, "train": 60.0, "evaluate": 5.0, "total": 70.0},
              {"name": "/models/minilm/model", "parameters": 22788000, "trainable_parameters": 74000},
              config={"lora": {"enabled": True, "r": 8}})
    write_run(folder, "e3", "exercise_3",
              {"zero_shot": {"validation": {**scores(0.02), "top5_accuracy": 0.10}},
               "lora": {"validation": {**scores(0.09), "top5_accuracy": 0.30}}},
              {"zero_shot": 4.0, "train": 30.0, "lora": 6.0, "total": 45.0},
              # exercise 3 keeps the base model's count too; the total with adapters is what counts
              {"name": "/tmp/tiny-clip", "base_parameters": 1000000, "parameters": 1005000,
               "trainable_parameters": 5000},
              config={"dataset": "/shared/data/tiny-imagenet-200"})
    return folder


def table(markdown: str, heading: str) -> list[dict]:
    """The first table after `heading` as a list of {column: cell}."""
    lines = markdown.split(heading, 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = block[0], block[2:]  # block[1] is the --- line
    return [dict(zip(header, row)) for row in body]


def test_report_tables_and_numbers(runs):
    path = report.write_report(runs)
    text = path.read_text()
    assert path == runs / "REPORT.md"
    for heading in ("## exercise_1", "## exercise_2", "## exercise_3", "## Comparison across exercises"):
        assert heading in text

    exercise_1 = table(text, "## exercise_1")
    assert len(exercise_1) == 4
    svc_test = next(row for row in exercise_1 if row["stage"] == "svc" and row["split"] == "test")
    assert svc_test["accuracy"] == "0.7700" and svc_test["macro F1"] == "0.7600" and svc_test["time (s)"] == "19.9"
    assert svc_test["trainable / total params"] == "0 / 22,713,216" and svc_test["model"] == "minilm/model"
    assert "peak memory (MB)" not in svc_test  # nothing recorded in exercise 1

    exercise_2 = table(text, "## exercise_2")
    assert len(exercise_2) == 4 + 2 + 4  # e2-full, e2-lucky, sub/e2-lora
    full = {(row["run"], row["stage"], row["split"]): row for row in exercise_2}
    assert set(full) >= {("e2-full", "fine_tuned", "test"), ("sub/e2-lora", "pretrained", "validation")}
    row = full[("e2-full", "fine_tuned", "test")]
    assert (row["accuracy"], row["time (s)"], row["trainable / total params"], row["peak memory (MB)"]) == \
        ("0.8400", "105.0", "22,714,000 / 22,714,000", "1234.5")
    assert full[("e2-full", "pretrained", "test")]["trainable / total params"] == "0 / 22,714,000"
    assert full[("sub/e2-lora", "fine_tuned", "test")]["trainable / total params"] == "74,000 / 22,788,000"

    exercise_3 = table(text, "## exercise_3")
    assert [(row["stage"], row["accuracy"], row["top-5"]) for row in exercise_3] == \
        [("zero_shot", "0.0200", "0.1000"), ("lora", "0.0900", "0.3000")]


def test_comparison_picks_on_validation_and_shows_gains(runs):
    text = report.write_report(runs).read_text()
    comparison = {row["approach"]: row for row in table(text, "## Comparison across exercises")}
    assert set(comparison) == {"frozen features + SVC", "frozen features + logistic regression",
                               "pretrained, untrained head", "full fine-tuning", "LoRA fine-tuning",
                               "CLIP zero-shot", "CLIP + LoRA"}
    full = comparison["full fine-tuning"]
    assert (full["run"], full["accuracy"], full["vs. baseline"]) == ("e2-full", "0.8400", "+0.3500")
    lora = comparison["LoRA fine-tuning"]
    assert (lora["accuracy"], lora["vs. baseline"], lora["trainable / total params"]) == \
        ("0.7900", "+0.3100", "74,000 / 22,788,000")
    assert comparison["frozen features + SVC"]["accuracy"] == "0.7700"
    assert comparison["frozen features + SVC"]["run total (s)"] == "80.0"
    clip = comparison["CLIP + LoRA"]
    assert (clip["split"], clip["accuracy"], clip["vs. baseline"]) == ("validation", "0.0900", "+0.0700")
    assert clip["trainable / total params"] == "5,000 / 1,005,000"
    assert comparison["CLIP zero-shot"]["trainable / total params"] == "0 / 1,000,000"  # before adapters
    assert comparison["pretrained, untrained head"]["run"] == "e2-full"  # 0.50 ties: the first run seen stays
    assert (runs / "comparison.png").stat().st_size > 0 and "![comparison](comparison.png)" in text


def test_tensorboard_text_and_rerun(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report.write_report(runs)
    report.write_report(runs)  # a second report replaces the first, it does not pile up
    log_dir = runs / "tensorboard" / "report"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    logged = events.Tensors("report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "## Comparison across exercises" in logged and "0.8400" in logged


def test_evaluate_report_command(runs, tmp_path):
    done = subprocess.run([sys.executable, "report.py", str(runs), "--no-tensorboard"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (runs / "REPORT.md").exists() and not (runs / "tensorboard").exists()
    done = subprocess.run([sys.executable, "report.py", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_empty_folder_and_broken_file(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    text = report.write_report(tmp_path, tensorboard=False).read_text()
    assert "0 runs, 0 sweeps" in text and "## Comparison" not in text


@pytest.mark.parametrize("contents, reason", [
    ("{not json", "Expecting property name"), ("[1, 2]", "expected an object with a 'metrics' object"),
    ('{"metrics": {"svc": {"test": {"accuracy": "high"}}}}', "metrics of stage 'svc' split 'test' are not numbers"),
    ('{"metrics": {"svc": [0.5]}}', "metrics of stage 'svc'"), ('{"metrics": {}, "config": [1]}', "'config'"),
    (b"\xff\xfe broken", "codec can't decode")])
def test_a_broken_run_is_skipped_with_a_warning_and_the_report_still_written(runs, capsys, contents, reason):
    broken = runs / "broken" / "results.json"
    broken.parent.mkdir()
    broken.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    (runs / "broken-sweep").mkdir()
    (runs / "broken-sweep" / "sweep.json").write_text('{"axes": {"lr": [1, 2]}, "points": [{"name": "x"}]}')
    text = report.write_report(runs, tensorboard=False).read_text()
    assert "5 runs, 0 sweeps" in text and "| broken |" not in text
    warnings = capsys.readouterr().err
    assert f"warning: skipping {broken}: " in warnings and reason in warnings
    assert "broken-sweep/sweep.json: every point needs" in warnings


def test_report_command_errors_are_one_line(runs, tmp_path):
    for argv, message in (([str(runs), "--no-tensorbord"], "unexpected argument '--no-tensorbord'"),
                          ([str(runs / "e1" / "results.json")], "is a file"),
                          ([str(tmp_path / "missing")], "does not exist")):
        done = subprocess.run([sys.executable, "report.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    (runs / "REPORT.md").mkdir()
    with pytest.raises(report.LabError, match="cannot write the report .*a folder is in the way"):
        report.write_report(runs, tensorboard=False)


def test_report_shows_the_settings_that_differ(runs):
    text = report.write_report(runs, tensorboard=False).read_text()
    rows = {row["run"]: row for row in table(text, "## exercise_2")}
    assert rows["sub/e2-lora"]["settings that differ"] == "lora.enabled=True, lora.r=8"
    assert rows["e2-full"]["settings that differ"] == "lora.enabled=False, lora.r=-"
    assert "settings that differ" not in table(text, "## exercise_1")[0]  # one run: nothing to compare


def test_exercise_3_stages_side_by_side_with_the_runs_plots(tmp_path):
    folder = tmp_path / "runs"
    with_forgetting = lambda value, other: {"validation": {**scores(value), "top5_accuracy": value + 0.1},
                                            "forgetting": scores(other)}
    write_run(folder, "clip", "exercise_3",
              {"zero_shot": {"validation": {**scores(0.10), "top5_accuracy": 0.3}},
               "linear_probe_1shot": {"validation": {**scores(0.15), "top5_accuracy": 0.5}},
               "linear_probe_all": {"validation": {**scores(0.24), "top5_accuracy": 0.7}},
               "lora": {"validation": {**scores(0.30), "top5_accuracy": 0.8}},
               "lora_scale_0": with_forgetting(0.10, 0.60), "lora_scale_0.5": with_forgetting(0.22, 0.55),
               "lora_scale_1": with_forgetting(0.30, 0.40)},
              {"zero_shot": 4.0, "linear_probe_1shot": 0.5, "linear_probe_all": 1.5, "train": 30.0, "evaluate": 3.0,
               "lora_scale_0": 3.1, "lora_scale_0.5": 3.2, "lora_scale_1": 3.3, "total": 60.0},
              {"name": "/tmp/tiny-clip", "base_parameters": 1000000, "parameters": 1005000, "trainable_parameters": 5000},
              config={"dataset": "/shared/data/tiny-imagenet-200", "class_names": "clip"}, prompts=["a photo of a {}."],
              linear_probe={"linear_probe_1shot": {"shots": 1, "train_images": 10, "C": 0.1, "features": "pre_projection"},
                            "linear_probe_all": {"shots": "all", "train_images": 400, "C": 1.0,
                                                 "features": "pre_projection"}})
    for name in ("few_shot.png", "interpolation.png"):
        (folder / "clip" / name).write_bytes(b"png")
    text = report.write_report(folder).read_text()
    rows = table(text, "exercise 3's stages side by side")
    assert [row["stage"] for row in rows] == ["`zero_shot`", "`linear_probe_1shot`", "`linear_probe_all`", "`lora`",
                                              "`lora_scale_0`", "`lora_scale_0.5`", "`lora_scale_1`"]
    assert [row["forgetting set accuracy"] for row in rows] == ["-", "-", "-", "-", "0.6000", "0.5500", "0.4000"]
    assert [row["time (s)"] for row in rows] == ["4.0", "0.5", "1.5", "3.0", "3.1", "3.2", "3.3"]
    assert "1 per class (10 images, C=0.1)" in rows[1]["what"] and "scaled by 0.5" in rows[5]["what"]
    assert "![few-shot probes vs zero-shot](clip/few_shot.png)" in text and "(clip/interpolation.png)" in text
    comparison = table(text, "## Comparison across exercises")
    assert [row["approach"] for row in comparison] == ["CLIP zero-shot", "CLIP linear probe (frozen image features)",
                                                       "CLIP + LoRA"]
    exercise_3 = table(text, "## exercise_3")
    probe_row = next(row for row in exercise_3 if row["stage"] == "linear_probe_all")
    assert probe_row["trainable / total params"] == "0 / 1,000,000"       # frozen: the model as loaded
