"""A user's first runs meet typos, odd folders and missing keys: each ends in a clear message."""
import json
import os
import re
import stat
import subprocess
import sys

import pytest

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
        with pytest.raises(utils.LabError, match="cannot write to output folder"):
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
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot write to output folder") and "dataset" not in result.stderr


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
