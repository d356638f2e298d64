"""tools/check_readme.py: the README's quoted demo tables parsed and compared with a run's results.json (fast,
on synthetic runs), and (slow) `make demo` and `make demo-3` run afresh and checked against the README."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from conftest import ROOT
from tools import assets, check_readme
from utils import LabError

METRICS = {"svc": {"validation": {"accuracy": 0.7833020637898687, "precision_macro": 0.78394, "recall_macro": 0.7833,
                                  "f1_macro": 0.78321},
                   "test": {"accuracy": 0.7776735459662288, "precision_macro": 0.778, "recall_macro": 0.77767,
                            "f1_macro": 0.7776}},
           "logreg": {"validation": {"accuracy": 0.774859287054409, "precision_macro": 0.775, "recall_macro": 0.7749,
                                     "f1_macro": 0.7748},
                      "test": {"accuracy": 0.773921200750469, "precision_macro": 0.7743, "recall_macro": 0.7739,
                               "f1_macro": 0.7738}}}


def readme_quoting(table: str, exercise: str = "exercise_1", after: str = "\nrun folder: runs/x\n") -> str:
    """A README holding `table` as the demo table of `exercise`, as the real README quotes it."""
    return (f"# Labs\n\nSome text, a table that is not a demo:\n\n| a | b |\n| --- | --- |\n\n"
            f"<!-- demo: {exercise} -->\n```\n{table}\n{after}```\n\nMore text.\n")


def write_run(folder: Path, metrics: dict, exercise: str = "exercise_1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"exercise": exercise, "config": {}, "metrics": metrics}))
    return folder


def test_the_table_a_script_prints_parses_back_to_its_own_numbers():
    table = evaluate.results_table(METRICS)       # what exercise_1.py prints, trailing spaces included
    quoted = check_readme.quoted_tables(readme_quoting(table))
    assert set(quoted) == {"exercise_1"}
    cells = quoted["exercise_1"]
    assert len(cells) == 16 and cells["svc", "validation", "accuracy"] == "0.7833"
    assert cells["logreg", "test", "f1_macro"] == "0.7738"
    assert check_readme.compare(cells, METRICS) == []


def test_a_changed_digit_is_one_line_naming_the_number(tmp_path, capsys):
    table = evaluate.results_table(METRICS).replace("0.7749 ", "0.7759 ", 1)      # logreg validation accuracy
    readme = tmp_path / "README.md"
    readme.write_text(readme_quoting(table))
    run = write_run(tmp_path / "run", METRICS)
    problems, count = check_readme.check("exercise_1", run, readme)
    assert count == 16
    assert problems == ["logreg validation accuracy: the README quotes 0.7759, the run gives 0.7749"]
    with pytest.raises(LabError, match=r"1 of the 16 numbers README.md quotes for exercise_1 differ"):
        check_readme.main(["exercise_1", str(run), "--readme", str(readme)])
    assert capsys.readouterr().out == problems[0] + "\n"


def test_the_command_exits_2_on_a_mismatch_and_0_when_all_match(tmp_path):
    run = write_run(tmp_path / "run", METRICS)
    readme = tmp_path / "README.md"
    command = [sys.executable, "-m", "tools.check_readme", "exercise_1", str(run), "--readme", str(readme)]
    readme.write_text(readme_quoting(evaluate.results_table(METRICS)))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"README.md: all 16 numbers quoted for exercise_1 match {run}"
    readme.write_text(readme_quoting(evaluate.results_table(METRICS).replace("0.7777", "0.7778")))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout.splitlines() == ["svc test accuracy: the README quotes 0.7778, the run gives 0.7777",
                                        "svc test recall_macro: the README quotes 0.7778, the run gives 0.7777"]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: 2 of the 16 numbers")


def test_a_quote_may_keep_some_columns_and_fewer_decimals():
    quoted = check_readme.parse_table(["stage  split  accuracy", "-----  -----  --------",
                                       "svc    test   0.78", "logreg test   -"])
    assert quoted == {("svc", "test", "accuracy"): "0.78", ("logreg", "test", "accuracy"): "-"}
    assert check_readme.compare(quoted, {"svc": {"test": {"accuracy": 0.7777}},
                                         "logreg": {"test": {"accuracy": None}}}) == []
    assert check_readme.printed(8192, "8192") == "8192" and check_readme.printed(0.00625, "0.0063") == "0.0063"


def test_numbers_the_run_does_not_have_are_reported():
    quoted = {("svc", "test", "accuracy"): "0.7777", ("lora", "validation", "accuracy"): "0.0070",
              ("svc", "train", "accuracy"): "0.9", ("svc", "test", "top5_accuracy"): "0.9"}
    assert check_readme.compare(quoted, {"svc": {"test": {"accuracy": 0.7777}}}) == [
        "lora validation accuracy: the README quotes 0.0070, the run has no stage 'lora'",
        "svc train accuracy: the README quotes 0.9, the run has no split 'train' in stage 'svc'",
        "svc test top5_accuracy: the README quotes 0.9, the run has no 'top5_accuracy' there"]


@pytest.mark.parametrize("text, message", [
    ("<!-- demo: exercise_1 -->\nno fence here\n", "must be followed by a fenced"),
    ("<!-- demo: exercise_1 -->\n```\nstage split accuracy\n", "never closed"),
    ("<!-- demo: exercise_1 -->\n```\nsplit stage accuracy\nsvc test 0.1\n```\n", "expected a header"),
    ("<!-- demo: exercise_1 -->\n```\nstage split accuracy\nsvc test\n```\n", "2 cells under 3 columns"),
    ("<!-- demo: exercise_1 -->\n```\nstage split accuracy\n-----\n```\n", "no rows"),
    ("<!-- demo: exercise_1 -->\n```\nstage split accuracy\nsvc test 0.1\n```\n" * 2, "a second table"),
])
def test_a_malformed_quote_is_one_line_naming_where(text, message):
    with pytest.raises(LabError, match=message):
        check_readme.quoted_tables(text)


def test_wrong_exercise_missing_table_and_unfinished_run_are_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(readme_quoting(evaluate.results_table(METRICS)))
    with pytest.raises(LabError, match=r"quotes no table marked <!-- demo: exercise_3 --> \(marked: exercise_1\)"):
        check_readme.check("exercise_3", write_run(tmp_path / "r3", {}, "exercise_3"), readme)
    with pytest.raises(LabError, match="is a run of exercise_3, not exercise_1"):
        check_readme.check("exercise_1", tmp_path / "r3", readme)
    with pytest.raises(LabError, match="results.json is missing"):
        check_readme.check("exercise_1", tmp_path / "nothing", readme)
    with pytest.raises(LabError, match="usage"):
        check_readme.main(["exercise_1"])


def test_the_readme_quotes_the_demo_tables():
    tables = check_readme.quoted_tables((ROOT / "README.md").read_text(encoding="utf-8"))
    assert {"exercise_1", "exercise_3"} <= set(tables)
    assert {("svc", "test", "accuracy"), ("logreg", "test", "accuracy")} <= set(tables["exercise_1"])
    assert ("zero_shot", "validation", "accuracy") in tables["exercise_3"]


# ---------------------------------------------------------------------------------------------
# Slow: the demos run afresh, as the Makefile runs them, and the README checked against them
# ---------------------------------------------------------------------------------------------


def run_demo(args: list[str], timeout: int = 1800) -> None:
    env = {**os.environ, "LAB_SHARED_DIR": str(assets.shared_dir())}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args[:2])} failed:\n{done.stderr[-3000:]}"


def assert_readme_matches(exercise: str, run_dir: Path) -> None:
    problems, count = check_readme.check(exercise, run_dir)
    assert not problems, (f"README.md's table after <!-- demo: {exercise} --> differs from a fresh run in "
                          f"{len(problems)} of {count} numbers:\n" + "\n".join(problems))


@pytest.mark.slow
def test_make_demo_prints_the_numbers_the_readme_quotes(tmp_path, minilm_path, rt_dir):
    run_demo(["exercise_1.py", f"model_name={minilm_path}", f"dataset={rt_dir}", "pooling=mean",
              f"output_dir={tmp_path}", "run_name=demo"])
    assert_readme_matches("exercise_1", tmp_path / "demo")


@pytest.mark.slow
def test_make_demo_3_prints_the_numbers_the_readme_quotes(tmp_path, tiny_imagenet_dir, clip_tokenizer_dir):
    run_demo(["-m", "tools.build_tiny_clip", str(tmp_path / "tiny-clip"), f"tokenizer_dir={clip_tokenizer_dir}"])
    run_demo(["exercise_3.py", f"model_name={tmp_path / 'tiny-clip'}", f"dataset={tiny_imagenet_dir}",
              "max_train_samples=2000", f"output_dir={tmp_path / 'runs'}", "run_name=x"])
    assert_readme_matches("exercise_3", tmp_path / "runs" / "x")
