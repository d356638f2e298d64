"""A user's first runs meet typos, odd folders and missing keys: each ends in a clear message."""
import json
import os
import re
import stat
import subprocess
import sys

import pytest
from pathlib import Path

import hub
import exercise_1
import loggers
import utils
from conftest import ROOT


def test_model_folder_without_tokenizer(tmp_path, tiny_distilbert, rt_dir):
    from transformers import AutoModel

    folder = tmp_path / "weights-only"
    AutoModel.from_pretrained(tiny_distilbert).save_pretrained(folder)
    with pytest.raises(utils.LabError, match="no usable tokenizer"):
        exercise_1.main([f"model_name={folder}", f"dataset={rt_dir}", f"output_dir={tmp_path}",
                         "max_train_samples=10", "max_eval_samples=10", "wandb_mode=disabled"])


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(utils.LabError, match="does not exist"):
        hub.resolve_pretrained(str(tmp_path / "no-such-model"))


def test_wandb_online_without_a_key_stops_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(utils.LabError, match="no W&B API key"):
        loggers.configure_wandb_env({"wandb_mode": "online"}, tmp_path, "exercise_1")
    assert loggers.configure_wandb_env({"wandb_mode": "offline"}, tmp_path, "exercise_1") == "offline"
    assert os.environ["WANDB_DIR"] == str(tmp_path) and os.environ["WANDB_MODE"] == "offline"


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path):
    """W&B's run id lives in the run folder: resume=True (same folder) continues the W&B run, a new
    folder starts a new one. Each offline run holds run-<id>.wandb."""
    config = {"wandb_mode": "offline", "tensorboard": False}

    def wandb_ids(run_dir):
        loggers.RunLoggers(run_dir, config, "exercise_2").finish()
        return {path.stem.removeprefix("run-") for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}

    first, other = tmp_path / "cut", tmp_path / "other"
    first.mkdir(), other.mkdir()
    assert wandb_ids(first) == {loggers.wandb_run_id(first)}
    assert wandb_ids(first) == {loggers.wandb_run_id(first)}  # the resumed session: same id, no second run
    assert wandb_ids(other) == {loggers.wandb_run_id(other)} != {loggers.wandb_run_id(first)}


@pytest.mark.skipif(os.name != "posix", reason="permissions")
def test_read_only_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits; use an impossible path instead
            locked = tmp_path / "file-not-folder"
            locked.write_text("x")
        with pytest.raises(utils.LabError, match="cannot write to output folder|is a file, but the project keeps"):
            utils.prepare_run_dir(str(locked), "run", "exercise_1")
    finally:
        (tmp_path / "locked").chmod(stat.S_IRWXU)


def test_reruns_never_mix(tmp_path):
    first = utils.prepare_run_dir(str(tmp_path), "same", "exercise_1")
    (first / "results.json").write_text("{}")
    second = utils.prepare_run_dir(str(tmp_path), "same", "exercise_1")
    assert second.name == "same-2"
    assert utils.prepare_run_dir(str(tmp_path), "same", "exercise_1", resume=True) == first
    assert utils.prepare_run_dir(str(tmp_path), 123, "exercise_1").name == "123", "run_name=123 parses as an int"
    replaced = utils.prepare_run_dir(str(tmp_path), "same", "exercise_1", overwrite=True)
    assert replaced == first and not (first / "results.json").exists()


def test_no_unsafe_deserialisation_in_the_code():
    """Caches and adapters are safetensors; any torch.load must pass weights_only=True; no pickle."""
    for path in ROOT.glob("*.py"):
        source = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"^\s*import pickle|pickle\.load", source, re.M), path.name
        assert "trust_remote_code=True" not in source, path.name


RESERVE = "import sys, utils; print(utils.prepare_run_dir(sys.argv[1], sys.argv[2] or None, 'exercise_1').name)"


@pytest.mark.parametrize("run_name", ["same", ""])
def test_runs_started_together_get_folders_of_their_own(tmp_path, run_name):
    """Eight processes reserve a run folder at once, with one run_name or the default <exercise>-<time>
    (all in the same second): every one gets its own folder."""
    processes = [subprocess.Popen([sys.executable, "-c", RESERVE, str(tmp_path), run_name], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True) for _ in range(8)]
    names = [process.communicate(timeout=120)[0].strip().splitlines()[-1] for process in processes]
    assert len(set(names)) == 8 and sorted(path.name for path in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize("bad", ["../outside", "a/b", "..", ".", "cache"])
def test_run_name_is_one_plain_folder_inside_output_dir(tmp_path, bad):
    with pytest.raises(utils.LabError, match="one plain folder name"):
        utils.prepare_run_dir(str(tmp_path / "runs"), bad, "exercise_1")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "runs" / "a").exists()


def test_an_unusable_output_dir_is_refused_before_data_or_model(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "exercise_2.py", f"output_dir={blocker}/runs", "dataset=/no/such/data"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "dataset" not in result.stderr
    assert result.stderr == (f"error: {blocker} is a file, but the project keeps a folder there (output_dir "
                             f"{blocker}/runs is in it); move or remove it\n")


def test_messages_suggest_only_keys_the_script_has(tmp_path, capsys):
    """Exercise 1 cannot resume: its rerun hint offers overwrite=True only; exercises 2 and 3 also resume=True,
    and their resume refusal names resume_changes=True, a key both have."""
    import exercise_2
    import exercise_3

    for _ in range(2):
        utils.prepare_run_dir(str(tmp_path), "same", "exercise_1")
    hint = capsys.readouterr().out
    assert "overwrite=True replaces it" in hint and "resume" not in hint
    utils.prepare_run_dir(str(tmp_path), "same", "exercise_2", resume=False)
    assert "resume=True continues it" in capsys.readouterr().out
    assert not {"resume", "resume_changes"} & set(exercise_1.CONFIG)
    for module in (exercise_2, exercise_3):
        assert {"resume", "resume_changes"} <= set(module.CONFIG)
    result = subprocess.run([sys.executable, "exercise_1.py", "resume=true", f"output_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown config key 'resume'")


@pytest.mark.parametrize("run_name", ["same", None])
def test_two_runs_started_together_both_keep_their_results(tmp_path, tiny_distilbert, rt_dir, run_name):
    """Two real exercise 1 runs at once, with one run_name or default names (same second): two folders,
    two intact results, and the feature cache they share written whole."""
    args = [sys.executable, "exercise_1.py", f"model_name={tiny_distilbert}", f"dataset={rt_dir}",
            "max_train_samples=100", "max_eval_samples=40", "wandb_mode=disabled", "tensorboard=false",
            f"output_dir={tmp_path}", *([f"run_name={run_name}"] if run_name else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    assert [process.wait(timeout=300) for process in processes] == [0, 0], [p.stderr.read()[-2000:] for p in processes]
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("*/results.json"))]
    assert len(results) == 2 and results[0]["metrics"] == results[1]["metrics"]
    assert len({path.parent for path in tmp_path.glob("*/results.json")}) == 2


# ---------------------------------------------------------------------------------------------
# A plain file where the project keeps a folder of its own: one line naming it, exit code 2
# ---------------------------------------------------------------------------------------------

def file_in_place(folder, relative: str):
    """A plain file at `relative` inside `folder` (its parent folders made), where the project keeps a folder."""
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder\n")
    return path


def refusal(path, what: str) -> str:
    return f"{path} is a file, but the project keeps a folder there ({what}); move or remove it"


# the file's place below tmp_path, the arguments beyond the tiny ones, and what the message says is kept there
EXERCISE_1_FOLDERS = {"output_dir": ("runs", [], "output_dir, where run folders go"),
                      "feature cache": ("runs/cache", [], "the feature cache of exercise 1 and of exercise 3's linear probe"),
                      "run folder": ("runs/r", ["run_name=r"], "the run folder"),
                      "run folder to overwrite": ("runs/r", ["run_name=r", "overwrite=true"], "the run folder")}


@pytest.mark.parametrize("folder", EXERCISE_1_FOLDERS)
def test_exercise_1_refuses_a_file_in_place_of_its_folders(tmp_path, tiny_distilbert, rt_dir, folder):
    relative, args, what = EXERCISE_1_FOLDERS[folder]
    path = file_in_place(tmp_path, relative)
    with pytest.raises(utils.LabError) as error:
        exercise_1.main([f"model_name={tiny_distilbert}", f"dataset={rt_dir}", f"output_dir={tmp_path / 'runs'}",
                         "max_train_samples=20", "max_eval_samples=10", "wandb_mode=disabled", "tensorboard=false",
                         *args])
    assert str(error.value) == refusal(path, what)
    assert sorted(str(found.relative_to(tmp_path)) for found in tmp_path.rglob("*")) == \
        sorted(str(Path(relative).parents[i]) for i in range(len(Path(relative).parts) - 1)) + [relative]


# a resumed run finds its folders in the run folder already: what the message says each keeps, and the
# settings under which the run uses it
RESUMED_FOLDERS = {"predictions": ("the per-sample predictions", {}),
                   "adapter": ("the LoRA adapter", {"lora.enabled": "true"}),
                   "tensorboard": ("TensorBoard's event files", {"tensorboard": "true"}),
                   "wandb": ("the W&B run", {"wandb_mode": "offline"})}


@pytest.mark.parametrize("folder", RESUMED_FOLDERS)
def test_a_resumed_run_of_exercise_2_refuses_a_file_in_place_of_its_folders(tmp_path, tiny_distilbert, rt_dir,
                                                                            folder):
    import exercise_2
    from test_exercise_2 import tiny_args

    what, settings = RESUMED_FOLDERS[folder]
    path = file_in_place(tmp_path, f"runs/cut/{folder}")
    with pytest.raises(utils.LabError) as error:
        exercise_2.main(tiny_args(tiny_distilbert, rt_dir, tmp_path / "runs", run_name="cut", resume="true",
                                  **settings))
    assert str(error.value) == refusal(path, what)
    assert [found.name for found in (tmp_path / "runs" / "cut").iterdir()] == [folder], "refused before training"


@pytest.mark.parametrize("folder, what", [("checkpoints", "exercise 3's training checkpoints"),
                                          ("model", "exercise 3's fine-tuned model")])
def test_a_resumed_run_of_exercise_3_refuses_a_file_in_place_of_its_folders(tmp_path, clip_tokenizer_dir,
                                                                            tiny_imagenet_dir, folder, what):
    import exercise_3
    from test_exercise_3 import tiny_args
    from tools import build_tiny_clip

    model = build_tiny_clip.build_tiny_clip(tmp_path / "tiny-clip", tokenizer_dir=str(clip_tokenizer_dir))
    path = file_in_place(tmp_path, f"runs/cut/{folder}")
    with pytest.raises(utils.LabError) as error:
        exercise_3.main(tiny_args(model, tiny_imagenet_dir, tmp_path / "runs", run_name="cut", resume="true",
                                  **({"lora.enabled": "false"} if folder == "model" else {})))
    assert str(error.value) == refusal(path, what)


def test_a_sweep_refuses_a_file_in_place_of_its_folder(tmp_path, tiny_distilbert, rt_dir):
    import sweep

    path = file_in_place(tmp_path, "runs/grid")
    with pytest.raises(utils.LabError) as error:
        sweep.main([str(ROOT / "exercise_1.py"), f"model_name={tiny_distilbert}", f"dataset={rt_dir}",
                    "svc_C=0.5,1", f"output_dir={tmp_path / 'runs'}", "run_name=grid"])
    assert str(error.value) == refusal(path, "the sweep's folder")
    assert [found.name for found in (tmp_path / "runs").iterdir()] == ["grid"], "no point ran"


def test_a_file_in_place_of_the_feature_cache_ends_the_command_in_one_line(tmp_path, tiny_distilbert, rt_dir):
    path = file_in_place(tmp_path, "runs/cache")
    result = subprocess.run([sys.executable, "exercise_1.py", f"model_name={tiny_distilbert}", f"dataset={rt_dir}",
                             f"output_dir={tmp_path / 'runs'}", "max_train_samples=20", "max_eval_samples=10",
                             "wandb_mode=disabled", "tensorboard=false"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: " + refusal(path, "the feature cache of exercise 1 and of exercise 3's linear probe")
