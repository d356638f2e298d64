"""Config overrides: typing by the default's type, nested keys, clear errors, --help, exit codes."""
import subprocess
import sys

import pytest

import exercise_1
import training
import utils
from conftest import ROOT

DEFAULTS = {"name": "a", "count": 3, "rate": 0.1, "flag": False, "maybe": None, "sizes": [1, 2],
            "words": ["x"], "lora": {"r": 8, "targets": ["query", "value"]}}


def test_overrides_are_typed_by_their_defaults():
    config = utils.parse_config(DEFAULTS, ["name=b", "count=5", "rate=3e-5", "flag=true", "maybe=7",
                                           "sizes=4,8,16", "words=[p, q]", "lora.r=16", "lora.targets=query"])
    assert config == {"name": "b", "count": 5, "rate": 3e-5, "flag": True, "maybe": 7, "sizes": [4, 8, 16],
                      "words": ["p", "q"], "lora": {"r": 16, "targets": ["query"]}}
    assert DEFAULTS["lora"]["r"] == 8, "defaults must not be mutated"


@pytest.mark.parametrize("text, expected", [("none", None), ("0.5", 0.5), ("false", False), ("runs/x", "runs/x"),
                                            ("nan", "nan"), ("7", 7)])
def test_none_default_takes_a_literal(text, expected):
    assert utils.parse_config(DEFAULTS, [f"maybe={text}"])["maybe"] == expected


@pytest.mark.parametrize("argv, fragment", [
    (["bogus=1"], "unknown config key 'bogus'"),
    (["count=three"], "bad value 'three' for 'count'"),
    (["flag=maybe"], "bad value 'maybe' for 'flag'"),
    (["count"], "is not key=value"),
    (["lora.alpha=3"], "unknown config key 'lora.alpha'"),
])
def test_bad_overrides_name_the_key(argv, fragment):
    with pytest.raises(utils.LabError, match=fragment.replace("(", r"\(")) as error:
        utils.parse_config(DEFAULTS, argv)
    if "unknown" in fragment:
        assert "valid keys: name, count, rate" in str(error.value)


def test_choices_and_positive_sizes():
    with pytest.raises(utils.LabError, match=r"choose from \['a', 'b'\]"):
        utils.parse_config(DEFAULTS, ["name=c"], choices={"name": ("a", "b")})
    with pytest.raises(utils.LabError, match="'count' must be > 0"):
        utils.parse_config(DEFAULTS, ["count=0"], positive=("count",))
    with pytest.raises(utils.LabError, match="'sizes' must be > 0"):
        utils.parse_config(DEFAULTS, ["sizes=1,-2"], positive=("sizes",))
    assert utils.parse_config(DEFAULTS, ["maybe=none"], positive=("maybe",))["maybe"] is None


def test_help_prints_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        utils.parse_config(DEFAULTS, ["--help"], choices={"name": ("a", "b")})
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "count=3" in out and "lora.r=8" in out and "one of ['a', 'b']" in out


@pytest.mark.parametrize("argument, fragment", [("eval_batch_size=0", "'eval_batch_size' must be > 0"),
                                                ("pooling=max", "choose from ['cls', 'mean']"),
                                                ("wandb_mod=offline", "unknown config key 'wandb_mod'")])
def test_script_exits_2_with_one_line_before_loading_anything(tmp_path, argument, fragment):
    result = subprocess.run([sys.executable, "exercise_1.py", argument, f"output_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad config"


def test_script_help_lists_config():
    result = subprocess.run([sys.executable, "exercise_1.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "pooling='cls'" in result.stdout


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_mixed_precision_auto_follows_the_gpu_and_stays_off_the_cpu(monkeypatch, bf16_supported, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert training.trainer_precision("auto", "cuda") == expected  # GPUs without bf16 (T4, V100) get fp16
    assert training.trainer_precision("auto", "cpu") == training.trainer_precision("no", "cpu") == "no"
    for setting in ("bf16", "fp16"):
        with pytest.raises(utils.LabError, match="needs a CUDA GPU"):
            training.trainer_precision(setting, "cpu")


@pytest.mark.parametrize("script", ["exercise_1.py", "exercise_2.py", "exercise_3.py"])
def test_help_describes_every_key_from_the_comment_beside_it(script):
    """--help prints each key with its default and what it does: the comment beside it in CONFIG."""
    import importlib

    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    lines = {line.strip().split("=", 1)[0]: line for line in result.stdout.splitlines() if "=" in line}
    for key in utils._flatten(importlib.import_module(script.removesuffix(".py")).CONFIG):
        description = lines[key].split("  # ", 1)[1] if "  # " in lines[key] else ""
        assert len(description) > 8, f"{script}: {key} has no description"
    assert "# lora:" in result.stdout or script == "exercise_1.py"
