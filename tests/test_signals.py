"""Ctrl-C and SIGTERM outside training (issue 23): during exercise 1's feature extraction, any evaluation, or the
writing of predictions a run stops with one line saying where it was and what it kept, exit 130 / 143, and
leaves no partial file; the next run starts cleanly, and exercise 1's reuses the cache entries already written.
Real signals: sent to a subprocess once it prints a marker, or by the process to itself at the chosen moment."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import data
import evaluate
import exercise_1
import exercise_2
import exercise_3
import training
from conftest import ROOT, read_results
from test_clip import image_folder
from test_write_faults import cli, ex1_args, ex2_args, ex3_args, hidden_leftovers
from tools import build_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread", "ctrl_c_delivered")


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_delivered():
    """Ctrl-C as a terminal delivers it: a shell that starts a job in the background without job control (a CI
    runner, `nohup ... &`) sets SIGINT to be ignored, and its children inherit that, so no KeyboardInterrupt
    would ever come. Here and in the children these tests start, SIGINT is what it is in a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    return build_tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer_dir=str(clip_tokenizer_dir))


@pytest.fixture
def sigterm_caught():
    """Where nothing handles SIGTERM it would kill the test process itself: fail the test instead."""
    def reached(number, frame):
        raise AssertionError("SIGTERM reached the test's own handler: the script installs none")

    previous = signal.signal(signal.SIGTERM, reached)
    yield
    signal.signal(signal.SIGTERM, previous)


def signal_once(number: int):
    """A function that sends this process `number` the first time it is called."""
    sent = []

    def send():
        if not sent:
            sent.append(number)
            os.kill(os.getpid(), number)
    return send


# Exercise 1 whose extraction of the validation split announces itself, then takes a minute: the moment to signal
SLOW_VALIDATION = """
import sys, time
import exercise_1, utils
extract = exercise_1.extract_features
def slow(*args, desc="features", **kwargs):
    if desc == "features validation":
        print("MARKER extracting validation", file=sys.stderr, flush=True)
        time.sleep(60)
    return extract(*args, desc=desc, **kwargs)
exercise_1.extract_features = slow
sys.argv = ["exercise_1.py", *sys.argv[1:]]
utils.run_cli(exercise_1.main)
"""


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_features_keeps_the_cache_entries_and_the_rerun_reuses_them(tmp_path, tiny_distilbert, rt_dir,
                                                                                   number, capsys):
    args = ex1_args(tiny_distilbert, rt_dir, tmp_path)
    process = subprocess.Popen([sys.executable, "-c", SLOW_VALIDATION, *args], cwd=ROOT, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_sigint)
    for line in process.stderr:
        if line.startswith("MARKER"):
            break
    process.send_signal(number)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 128 + number, rest[-3000:]
    name = signal.Signals(number).name
    assert rest.strip().splitlines()[-1] == (
        f"interrupted ({name}) during features validation: no results written; the 1 cache entry of features "
        f"written so far (train) is kept in {tmp_path / 'cache'}, and a rerun reuses it")
    assert "Traceback" not in rest
    assert not (tmp_path / "r" / "results.json").exists() and not hidden_leftovers(tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    run_dir = exercise_1.main(args)                     # starts cleanly in a folder of its own, reusing train
    out = capsys.readouterr().out
    assert run_dir.name == "r-2" and (run_dir / "results.json").exists()
    assert "features train: reused cached features" in out and out.count("reused cached features") == 1


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_writing_predictions_leaves_no_partial_file(tmp_path, tiny_distilbert, rt_dir, monkeypatch,
                                                                 capsys, number, sigterm_caught):
    """The signal comes once svc_test.csv's bytes are written but before the file is complete (its fsync)."""
    fsync, send = os.fsync, signal_once(number)

    def signal_mid_write(fd):
        if "svc_test.csv" in os.readlink(f"/proc/self/fd/{fd}"):
            send()
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", signal_mid_write)
    code, err = cli(monkeypatch, capsys, exercise_1.main, ex1_args(tiny_distilbert, rt_dir, tmp_path))
    name = signal.Signals(number).name
    assert code == 128 + number and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted ({name}) during fitting and scoring the svc classifier: no results written; the 3 cache entries "
        f"of features written so far (train, validation, test) are kept in {tmp_path / 'cache'}, and a rerun reuses them")
    run_dir = tmp_path / "r"
    assert [path.name for path in (run_dir / "predictions").iterdir()] == ["svc_validation.csv"]
    assert len(evaluate.read_predictions(run_dir / "predictions" / "svc_validation.csv")) == 60
    assert not (run_dir / "results.json").exists() and not hidden_leftovers(tmp_path)


def test_sigterm_before_any_stage_exits_143_with_one_line(tmp_path, tiny_distilbert, rt_dir, monkeypatch, capsys,
                                                         sigterm_caught):
    load, send = data.load_text_dataset, signal_once(signal.SIGTERM)
    monkeypatch.setattr(data, "load_text_dataset", lambda *args, **kwargs: (send(), load(*args, **kwargs))[1])
    code, err = cli(monkeypatch, capsys, exercise_2.main, ex2_args(tiny_distilbert, rt_dir, tmp_path))
    assert code == 143 and err.strip().splitlines()[-1] == "interrupted (SIGTERM)" and not list(tmp_path.iterdir())


def test_sigterm_during_the_pretrained_evaluation(tmp_path, tiny_distilbert, rt_dir, monkeypatch, capsys,
                                                  sigterm_caught):
    step, send = training.LabTrainer.prediction_step, signal_once(signal.SIGTERM)
    monkeypatch.setattr(training.LabTrainer, "prediction_step", lambda self, *a, **k: (send(), step(self, *a, **k))[1])
    code, err = cli(monkeypatch, capsys, exercise_2.main,
                    ex2_args(tiny_distilbert, rt_dir, tmp_path, evaluate_pretrained=True))
    assert code == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted (SIGTERM) during the pretrained evaluation: no results written; no complete checkpoint is in "
        f"{tmp_path / 'r'}: run again with the same arguments")
    assert not (tmp_path / "r" / "results.json").exists() and not list((tmp_path / "r").glob("checkpoint-*"))


def test_sigterm_during_the_fine_tuned_evaluation_then_resume_only_evaluates(tmp_path, tiny_distilbert, rt_dir,
                                                                             monkeypatch, capsys, sigterm_caught):
    train, step, send = training.LabTrainer.train, training.LabTrainer.prediction_step, signal_once(signal.SIGTERM)

    def trained(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        self.trained = True
        return output

    monkeypatch.setattr(training.LabTrainer, "train", trained)
    monkeypatch.setattr(training.LabTrainer, "prediction_step",
                        lambda self, *a, **k: (getattr(self, "trained", False) and send(), step(self, *a, **k))[1])
    args = ex2_args(tiny_distilbert, rt_dir, tmp_path)
    code, err = cli(monkeypatch, capsys, exercise_2.main, args)
    run_dir = tmp_path / "r"
    assert code == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted (SIGTERM) during the fine_tuned evaluation: no results written; the last complete checkpoint is "
        f"{run_dir / 'checkpoint-8'}: continue with the same arguments plus resume=True run_name=r "
        f"output_dir={tmp_path}")
    assert not (run_dir / "results.json").exists() and not (run_dir / "predictions").exists()
    monkeypatch.undo()
    results = read_results(exercise_2.main([*args, "resume=True"]))
    assert results["training"]["global_step"] == 8, "a resume from the last step trains no further"


def test_a_second_sigterm_during_training_stops_at_once_naming_the_last_checkpoint(tmp_path, tiny_distilbert, rt_dir,
                                                                                   monkeypatch, capsys, sigterm_caught):
    from transformers import TrainerCallback

    class TwoSignals(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                os.kill(os.getpid(), signal.SIGTERM)       # the first: finish the step, save, stop
                os.kill(os.getpid(), signal.SIGTERM)       # the second: stop now

    main = lambda argv: exercise_2.main(argv, callbacks=[TwoSignals()])
    code, err = cli(monkeypatch, capsys, main, ex2_args(tiny_distilbert, rt_dir, tmp_path))
    run_dir = tmp_path / "r"
    assert code == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted (SIGTERM) during training (a second signal stops at once, without a checkpoint): no results "
        f"written; the last complete checkpoint is {run_dir / 'checkpoint-4'}: continue with the same arguments plus "
        f"resume=True run_name=r output_dir={tmp_path}")
    assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == ["checkpoint-4"]


@pytest.mark.parametrize("call, stage", [(1, "the zero-shot evaluation"), (2, "the lora evaluation")])
def test_sigterm_during_a_zero_shot_evaluation(tmp_path, tiny_clip_dir, monkeypatch, capsys, sigterm_caught, call,
                                               stage):
    import clip

    logits, calls = clip.zero_shot_logits, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return logits(*args, **kwargs)

    monkeypatch.setattr(clip, "zero_shot_logits", counted)
    code, err = cli(monkeypatch, capsys, exercise_3.main,
                    ex3_args(tiny_clip_dir, image_folder(tmp_path / "d"), tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "r"
    kept = (f"no complete checkpoint is in {run_dir / 'checkpoints'}: run again with the same arguments" if call == 1
            else f"the last complete checkpoint is {run_dir / 'checkpoints' / 'checkpoint-4'}: continue with the same "
                 f"arguments plus resume=True run_name=r output_dir={tmp_path / 'runs'}")
    assert code == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted (SIGTERM) during {stage}: no results written; {kept}"
    assert not (run_dir / "results.json").exists() and not (run_dir / "predictions").exists()
