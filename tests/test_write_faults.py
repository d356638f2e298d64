"""Write faults (issue 23): a full disk, a permission lost, the run folder removed mid-run. Each ends in one line
naming the file, why, what was kept and how to go on (exit 2), and leaves no half-written file that a later
run would take for complete. Full disks are real where a tmpfs can be mounted (root, as in CI); elsewhere
those tests skip with the reason, and the same paths are also covered by injecting the OSError."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import cache
import evaluate
import exercise_1
import exercise_2
import exercise_3
import faults
import LoRA
import plots
import training
import utils
from conftest import read_results
from test_clip import image_folder
from tools import build_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextmanager
def small_disk(folder: Path, size: int):
    """A tmpfs of `size` bytes mounted at `folder`: writes past it fail with ENOSPC, as on a full disk."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs at {folder} ({mounted.stderr.strip() or mounted.returncode}): needs root; "
                    f"the injected-OSError tests cover the same paths")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def cli(monkeypatch, capsys, main, args) -> tuple[int, str]:
    """Run `main` as its script does (utils.run_cli): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["script.py", *args])
    try:
        utils.run_cli(main)
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The run's one error line; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def hidden_leftovers(folder: Path) -> list[Path]:
    """Temporary files or folders of an atomic write left behind."""
    return [path for path in Path(folder).rglob(".*") if path.name.endswith((".tmp", ".old"))]


def fail_on(monkeypatch, matches, number: int = errno.ENOSPC, error=None):
    """Make the atomic write of every path that `matches` fail part-way: a few bytes of it are written to the
    temporary file (or folder), then the write raises OSError(number), or `error` as safetensors would."""
    real = faults.replace_whole

    def write(path, save):
        if not matches(Path(path)):
            return real(path, save)

        def partial(tmp: Path):
            target = tmp / "adapter_model.safetensors" if path.suffix == "" else tmp
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(b"\x00" * 100)
            raise error or OSError(number, "injected", str(tmp))
        return real(path, partial)

    monkeypatch.setattr(faults, "replace_whole", write)


def ex1_args(model, dataset, output_dir, **overrides) -> list[str]:
    config = {"model_name": model, "dataset": dataset, "output_dir": output_dir, "max_train_samples": 200,
              "max_eval_samples": 60, "wandb_mode": "disabled", "tensorboard": False, "run_name": "r"}
    config.update(overrides)
    return [f"{key}={value}" for key, value in config.items()]


def ex2_args(model, dataset, output_dir, **overrides) -> list[str]:
    config = {"model_name": model, "dataset": dataset, "output_dir": output_dir, "max_train_samples": 96,
              "max_eval_samples": 32, "batch_size": 8, "eval_batch_size": 32, "learning_rate": 1e-2, "max_steps": 8,
              "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 2, "warmup": 0, "evaluate_pretrained": False,
              "wandb_mode": "disabled", "tensorboard": False, "seed": 0, "run_name": "r"}
    config.update(overrides)
    return [f"{key}={value}" for key, value in config.items()]


# ---------------------------------------------------------------------------------------------
# The writers: whole or not at all, on a really full disk
# ---------------------------------------------------------------------------------------------

def test_a_full_disk_leaves_no_file_and_keeps_the_earlier_one(tmp_path):
    with small_disk(tmp_path / "disk", 64 * 1024) as disk:
        utils.write_atomic(disk / "results.json", b'{"old": 1}')
        with pytest.raises(faults.WriteError) as failed:
            utils.write_atomic(disk / "results.json", b"x" * 200_000)
        assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(disk / "results.json")
        assert (disk / "results.json").read_bytes() == b'{"old": 1}' and not hidden_leftovers(disk)
        assert faults.write_fault(failed.value, "kept").startswith(
            f"cannot write {disk / 'results.json'}: no space left on the device (free some, or set output_dir=")

        figure = plots.plot_confusion_matrix(np.eye(3, dtype=int) * 5, ["a", "b", "c"])
        utils.write_atomic(disk / "filler", b"x" * (disk_free(disk) - 4096))
        with pytest.raises(faults.WriteError, match="No space left"):
            plots.save_figure(figure, disk / "confusion.png")
        assert not (disk / "confusion.png").exists() and not hidden_leftovers(disk)


def disk_free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def test_the_wandb_run_id_is_written_whole(tmp_path):
    """An empty .wandb_run_id from a full disk would be taken as the id a resumed run logs into."""
    import loggers

    with small_disk(tmp_path / "disk", 64 * 1024) as disk:
        utils.write_atomic(disk / "filler", b"x" * disk_free(disk))
        with pytest.raises(faults.WriteError):
            loggers.wandb_run_id(disk)
        assert not (disk / ".wandb_run_id").exists() and not hidden_leftovers(disk)


def test_folders_from_safetensors_and_torch_save_on_a_full_disk(tmp_path):
    """safetensors and torch.save report a full disk in their own exceptions: still a WriteError naming the
    folder, the temporary folder removed and the earlier folder kept."""
    from safetensors.torch import save_file

    weights = {"w": torch.zeros(200_000)}
    with small_disk(tmp_path / "disk", 512 * 1024) as disk:
        faults.replace_whole(disk / "adapter", lambda tmp: (tmp.mkdir(), save_file({"w": torch.ones(4)},
                                                                                   str(tmp / "a.safetensors"))))
        for save in (lambda tmp: save_file(weights, str(tmp / "a.safetensors")),
                     lambda tmp: torch.save(weights, tmp / "optimizer.pt")):
            with pytest.raises(faults.WriteError) as failed:
                faults.replace_whole(disk / "adapter", lambda tmp: (tmp.mkdir(), save(tmp)))
            assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(disk / "adapter")
            assert sorted(path.name for path in disk.iterdir()) == ["adapter"] and not hidden_leftovers(disk)
        from safetensors.torch import load_file

        assert load_file(str(disk / "adapter" / "a.safetensors"))["w"].tolist() == [1, 1, 1, 1]


def test_an_error_that_is_no_write_fault_keeps_its_traceback(tmp_path):
    def buggy(tmp):
        tmp.write_text("half")
        raise TypeError("a bug, not a full disk")

    with pytest.raises(TypeError, match="a bug"):
        faults.replace_whole(tmp_path / "x.json", buggy)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Exercise 1: results, predictions, plots, classifiers; the feature cache goes on without caching
# ---------------------------------------------------------------------------------------------

def test_exercise_1_on_a_disk_that_fills_while_saving(tmp_path, tiny_distilbert, rt_dir, monkeypatch, capsys):
    """400 KB: the run folder is made, then the predictions files (over a third of it) fill it."""
    with small_disk(tmp_path / "runs", 400 * 1024) as runs:
        code, err = cli(monkeypatch, capsys, exercise_1.main,
                        ex1_args(tiny_distilbert, rt_dir, runs, max_eval_samples=None, cache_features=False))
        line = error_line(err)
        assert code == 2 and line.startswith(f"error: cannot write {runs / 'r'}/") and "no space left on the device" in line
        assert line.endswith("no results written; no features were cached yet")
        run_dir = runs / "r"
        assert not (run_dir / "results.json").exists() and not hidden_leftovers(runs)
        written = list((run_dir / "predictions").glob("*.csv"))
        assert written, "the disk filled before any predictions file: resize the tmpfs"
        for path in written:                        # every file that is there is whole
            assert len(evaluate.read_predictions(path)) == 1066
        for path in run_dir.glob("*.png"):
            from PIL import Image

            Image.open(path).load()


def test_exercise_1_goes_on_without_caching_when_the_cache_disk_is_full(tmp_path, tiny_distilbert, rt_dir,
                                                                      monkeypatch, capsys):
    runs = tmp_path / "runs"
    with small_disk(runs / "cache", 16 * 1024):
        code, err = cli(monkeypatch, capsys, exercise_1.main, ex1_args(tiny_distilbert, rt_dir, runs))
        assert code == 0 and (runs / "r" / "results.json").exists()
        warnings = [line for line in err.splitlines() if line.startswith("warning: cannot write")]
        assert len(warnings) == 1, err                # once, not once per split
        assert str(runs / "cache") in warnings[0] and "no space left" in warnings[0]
        assert "going on without caching features" in warnings[0]
        assert not list((runs / "cache").iterdir())


def test_exercise_1_feature_cache_write_fault_injected(tmp_path, tiny_distilbert, rt_dir, monkeypatch, capsys):
    def full(path, data):
        raise faults.WriteError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache, "write_atomic", full)
    code, err = cli(monkeypatch, capsys, exercise_1.main, ex1_args(tiny_distilbert, rt_dir, tmp_path))
    assert code == 0 and (tmp_path / "r" / "results.json").exists()
    assert err.count("warning: cannot write") == 1 and "going on without caching features" in err


def test_exercise_1_permission_lost_on_the_classifiers(tmp_path, tiny_distilbert, rt_dir, monkeypatch, capsys):
    fail_on(monkeypatch, lambda path: path.suffix == ".skops", errno.EACCES)
    code, err = cli(monkeypatch, capsys, exercise_1.main, ex1_args(tiny_distilbert, rt_dir, tmp_path))
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: cannot write {tmp_path / 'r' / 'classifiers' / 'svc.skops'}: "
                                         f"permission denied (make the folder writable again")
    assert line.endswith(f"no results written; the 3 cache entries of features written so far (train, validation, "
                         f"test) are kept in {tmp_path / 'cache'}, and a rerun reuses them")
    assert not list((tmp_path / "r" / "classifiers").iterdir()) and not (tmp_path / "r" / "results.json").exists()
    monkeypatch.undo()                                  # permission back: the rerun reuses every cached split
    assert (exercise_1.main(ex1_args(tiny_distilbert, rt_dir, tmp_path)) / "results.json").exists()
    assert capsys.readouterr().out.count("reused cached features") == 3


def test_exercise_1_run_folder_removed_mid_run_is_not_made_anew(tmp_path, tiny_distilbert, rt_dir, monkeypatch, capsys):
    fit = exercise_1.fit_classifier

    def removed_first(*args, **kwargs):
        shutil.rmtree(tmp_path / "r", ignore_errors=True)
        return fit(*args, **kwargs)

    monkeypatch.setattr(exercise_1, "fit_classifier", removed_first)
    code, err = cli(monkeypatch, capsys, exercise_1.main, ex1_args(tiny_distilbert, rt_dir, tmp_path))
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: cannot write {tmp_path / 'r' / 'predictions'}: its folder no longer "
                                         f"exists (was the run folder removed while the run was going?)")
    assert not (tmp_path / "r").exists(), "a removed run folder must not be made anew"


# ---------------------------------------------------------------------------------------------
# Exercises 2 and 3: the Trainer's checkpoints, the adapter, the results
# ---------------------------------------------------------------------------------------------

def test_exercise_2_disk_full_during_a_checkpoint_keeps_the_last_complete_one(tmp_path, tiny_distilbert, rt_dir,
                                                                            monkeypatch, capsys):
    """Checkpoints at steps 4, 8, 12 on a disk with room for about one and a half: checkpoint-8 fails part-way.
    Its folder is removed (latest_checkpoint and resume see checkpoint-4), the line gives the resume command,
    and that command, once there is room, finishes the run."""
    model = Path(tiny_distilbert)
    checkpoint = 3 * (model / "model.safetensors").stat().st_size + sum(  # weights, Adam's two moments, tokenizer
        path.stat().st_size for path in model.glob("tokenizer*"))
    with small_disk(tmp_path / "runs", int(1.6 * checkpoint)) as runs:
        args = ex2_args(tiny_distilbert, rt_dir, runs, max_steps=12)
        code, err = cli(monkeypatch, capsys, exercise_2.main, args)
        line = error_line(err)
        run_dir = runs / "r"
        assert code == 2 and line.startswith(f"error: cannot write {run_dir / 'checkpoint-8'}: no space left on the "
                                             f"device")
        assert line.endswith(f"no results written; the last complete checkpoint is {run_dir / 'checkpoint-4'}: "
                             f"continue with the same arguments plus resume=True run_name=r output_dir={runs}")
        assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == ["checkpoint-4"]
        assert training.latest_checkpoint(run_dir) == run_dir / "checkpoint-4" and not hidden_leftovers(runs)
        assert not (run_dir / "results.json").exists()

        subprocess.run(["mount", "-o", "remount,size=64m", str(runs)], check=True)     # room again
        results = read_results(exercise_2.main([*args, "resume=True"]))
        assert results["training"]["resumed_from"] == str(run_dir / "checkpoint-4")
        assert results["training"]["global_step"] == 12


def test_exercise_2_results_that_cannot_be_written_name_the_checkpoint_to_finish_from(tmp_path, tiny_distilbert,
                                                                                     rt_dir, monkeypatch, capsys):
    fail_on(monkeypatch, lambda path: path.name == "results.json")
    args = ex2_args(tiny_distilbert, rt_dir, tmp_path)
    code, err = cli(monkeypatch, capsys, exercise_2.main, args)
    line, run_dir = error_line(err), tmp_path / "r"
    assert code == 2 and line.startswith(f"error: cannot write {run_dir / 'results.json'}: no space left on the device")
    assert line.endswith(f"no results written; the last complete checkpoint is {run_dir / 'checkpoint-8'}: continue "
                         f"with the same arguments plus resume=True run_name=r output_dir={tmp_path}")
    assert not (run_dir / "results.json").exists() and not hidden_leftovers(tmp_path)
    monkeypatch.undo()
    results = read_results(exercise_2.main([*args, "resume=True"]))     # trains no further, writes the results
    assert results["training"]["resumed_from"] == str(run_dir / "checkpoint-8")
    assert results["training"]["global_step"] == 8


def test_exercise_2_checkpoint_fault_injected(tmp_path, tiny_distilbert, rt_dir, monkeypatch, capsys):
    """Without a tmpfs: the optimizer's torch.save fails as on a full disk, at the second checkpoint."""
    save = training.LabTrainer._save_optimizer_and_scheduler

    def full_at_8(self, output_dir):
        if output_dir.endswith("checkpoint-8"):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.pt"))
        return save(self, output_dir)

    monkeypatch.setattr(training.LabTrainer, "_save_optimizer_and_scheduler", full_at_8)
    code, err = cli(monkeypatch, capsys, exercise_2.main, ex2_args(tiny_distilbert, rt_dir, tmp_path, max_steps=12))
    line, run_dir = error_line(err), tmp_path / "r"
    assert code == 2 and line.startswith(f"error: cannot write {run_dir / 'checkpoint-8'}: no space left")
    assert f"the last complete checkpoint is {run_dir / 'checkpoint-4'}: continue" in line
    assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == ["checkpoint-4"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    return build_tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer_dir=str(clip_tokenizer_dir))


def ex3_args(model, dataset, output_dir, **overrides) -> list[str]:
    config = {"model_name": model, "dataset": dataset, "output_dir": output_dir, "max_steps": 4, "batch_size": 4,
              "eval_batch_size": 8, "save_steps": 100, "logging_steps": 2, "num_sample_images": 4, "warmup": 0,
              "wandb_mode": "disabled", "tensorboard": False, "seed": 0, "run_name": "r"}
    config.update(overrides)
    return [f"{key}={value}" for key, value in config.items()]


def test_exercise_3_adapter_that_cannot_be_written(tmp_path, tiny_clip_dir, monkeypatch, capsys):
    """safetensors' own error for a full disk, part of the adapter folder written: no adapter/ is left."""
    from safetensors import SafetensorError

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    fail_on(monkeypatch, lambda path: path.name == "adapter", error=full)
    code, err = cli(monkeypatch, capsys, exercise_3.main, ex3_args(tiny_clip_dir, image_folder(tmp_path / "d"),
                                                                   tmp_path / "runs"))
    line, run_dir = error_line(err), tmp_path / "runs" / "r"
    assert code == 2 and line.startswith(f"error: cannot write {run_dir / 'adapter'}: no space left on the device")
    # the Trainer saves a checkpoint when training ends: that is what resume=True continues (here: only evaluates)
    assert line.endswith(f"no results written; the last complete checkpoint is {run_dir / 'checkpoints' / 'checkpoint-4'}"
                         f": continue with the same arguments plus resume=True run_name=r output_dir={tmp_path / 'runs'}")
    assert not (run_dir / "adapter").exists() and not hidden_leftovers(run_dir)


def test_exercise_3_run_folder_removed_during_training(tmp_path, tiny_clip_dir, monkeypatch, capsys):
    from transformers import TrainerCallback

    run_dir = tmp_path / "runs" / "r"

    class RemoveRunFolder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                shutil.rmtree(run_dir)

    main = lambda argv: exercise_3.main(argv, callbacks=[RemoveRunFolder()])
    code, err = cli(monkeypatch, capsys, main, ex3_args(tiny_clip_dir, image_folder(tmp_path / "d"),
                                                        tmp_path / "runs", save_steps=2))
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: cannot write {run_dir / 'checkpoints' / 'checkpoint-2'}: its folder "
                                         f"no longer exists")
    assert not run_dir.exists(), "the Trainer must not make the removed run folder anew"


def test_a_lora_adapter_on_a_full_disk(tmp_path, tiny_clip_dir):
    """LoRA.save_adapter itself, on a really full disk: an earlier adapter stays whole."""
    import clip

    model = LoRA.apply_lora(clip.load_clip(str(tiny_clip_dir))[0], {
        "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, task_type=None)
    with small_disk(tmp_path / "disk", 256 * 1024) as disk:
        LoRA.save_adapter(model, disk / "adapter")
        before = sorted((path.name, path.stat().st_size) for path in (disk / "adapter").iterdir())
        utils.write_atomic(disk / "filler", b"x" * (disk_free(disk) - 8192))
        with pytest.raises(faults.WriteError) as failed:
            LoRA.save_adapter(model, disk / "adapter")
        assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(disk / "adapter")
        assert sorted((path.name, path.stat().st_size) for path in (disk / "adapter").iterdir()) == before
        assert not hidden_leftovers(disk)
