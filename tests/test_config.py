"""Config overrides: typing by the default's type, nested keys, clear errors, --help, exit codes."""
import os
import subprocess
import sys

import pytest

import devices
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


class FakeGPU:
    """What torch.cuda.get_device_properties reports, reduced to the compute capability."""

    def __init__(self, major: int, minor: int):
        self.major, self.minor, self.name = major, minor, f"a GPU of compute capability {major}.{minor}"


@pytest.mark.parametrize("emulates", [False, True])
@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_mixed_precision_auto_follows_what_the_gpu_computes_natively(monkeypatch, capability, expected, emulates):
    """Only the device is faked (there, with this compute capability): torch's own bf16 check runs. Pre-Ampere
    GPUs (T4 is 7.5, V100 7.0) emulate bf16: on a real one torch's last resort, making a bf16 tensor on the device,
    succeeds (`emulates`), and its default check then counts that as support."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: FakeGPU(*capability))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulates)
    assert devices.precision("auto", "cuda") == expected
    for setting in ("no", "bf16", "fp16"):
        assert devices.precision(setting, "cuda") == setting


def test_precision_on_the_cpu_and_for_a_later_command(capsys):
    assert devices.precision("auto", "cpu") == devices.precision("no", "cpu") == "no"
    assert devices.precision("bf16", "cpu") == "bf16"              # allowed: slow, to check dtype paths
    devices.warn_slow_precision("bf16", "cpu")
    assert "far slower than fp32" in capsys.readouterr().err
    with pytest.raises(utils.LabError, match="mixed_precision=fp16 needs a CUDA GPU"):
        devices.precision("fp16", "cpu")
    assert devices.replay_precision("fp16", "cpu") == "no" and "predicting in fp32" in capsys.readouterr().err
    assert devices.replay_precision("bf16", "cpu") == "bf16" and devices.replay_precision("auto", "cpu") == "no"
    import torch

    with devices.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with devices.autocast("cpu", "no"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_loader_workers_and_pinned_memory(monkeypatch):
    assert devices.loader_workers("auto", "cpu") == 0 and devices.loader_workers("3", "cpu") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert devices.loader_workers("auto", "cuda") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                     # four processes share the 16 cores
    assert devices.loader_workers("auto", "cuda") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert devices.loader_workers("auto", "cuda") == 1
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(utils.LabError, match="dataloader_num_workers must be auto or a whole number"):
            devices.loader_workers(bad, "cuda")
    assert devices.pin_memory("cuda") and not devices.pin_memory("cpu")


def test_batches_reach_a_gpu_through_pinned_memory():
    import torch

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert not devices.to_device(batch, "cpu")["input_ids"].is_pinned()
    if not torch.cuda.is_available():       # the CUDA path is torch's own pin_memory, which needs an accelerator
        with pytest.raises(RuntimeError, match="accelerator"):
            devices.to_device(batch, "cuda")


@pytest.mark.parametrize("script", ["exercise_1.py", "exercise_2.py", "exercise_3.py"])
def test_help_describes_every_key_from_the_comment_beside_it(script):
    """--help prints each key with its default and what it does: the comment beside it in CONFIG."""
    import importlib

    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    lines = {line.strip().split("=", 1)[0]: line for line in result.stdout.splitlines() if "=" in line}
    for key in utils.flatten(importlib.import_module(script.removesuffix(".py")).CONFIG):
        description = lines[key].split("  # ", 1)[1] if "  # " in lines[key] else ""
        assert len(description) > 8, f"{script}: {key} has no description"
    assert "# lora:" in result.stdout or script == "exercise_1.py"


# ---------------------------------------------------------------------------------------------
# Numbers: finite, in range, whole where they count things; each refused by name at parse time
# ---------------------------------------------------------------------------------------------

NUMBERS = {"rate": 0.1, "grid": [0.1, 1.0], "limit": None, "seed": 42, "workers": 0}
RANGES = {"positive": ("rate", "grid", "limit"), "non_negative": ("workers",), "fractions": (), "integers": ("limit",)}


@pytest.mark.parametrize("argument, fragment", [
    ("rate=nan", "bad value 'nan' for 'rate' (a float; default 0.1): expected a finite number"),
    ("rate=inf", "bad value 'inf' for 'rate'"),
    ("rate=-Infinity", "bad value '-Infinity' for 'rate'"),
    ("grid=1,nan", "bad value '1,nan' for 'grid'"),
    ("rate=0", "'rate' must be > 0, got 0.0"),
    ("grid=1,-2", "'grid' must be > 0, got [1.0, -2.0]"),
    ("workers=-1", "'workers' must be >= 0, got -1"),
    ("limit=nan", "bad value 'nan' for 'limit': expected a whole number > 0 or none"),
    ("limit=abc", "bad value 'abc' for 'limit': expected a whole number > 0 or none"),
    ("limit=2.5", "bad value 2.5 for 'limit': expected a whole number > 0 or none"),
    ("limit=true", "bad value True for 'limit'"),
    ("limit=-3", "'limit' must be > 0 (or None), got -3"),
    ("grid=", "bad value [] for 'grid': expected one or more numbers > 0"),
    ("seed=-1", "'seed' must be in [0, 4294967295], got -1"),
    ("seed=4294967296", "'seed' must be in [0, 4294967295]"),
])
def test_bad_numbers_are_refused_by_name(argument, fragment):
    with pytest.raises(utils.LabError) as error:
        utils.parse_config(NUMBERS, [argument], **RANGES)
    assert fragment in str(error.value)


def test_fractions_and_whole_numbers():
    lora = {"lora": {"dropout": 0.1}}
    assert utils.parse_config(lora, ["lora.dropout=0"], fractions=("lora.dropout",))["lora"]["dropout"] == 0
    for bad in ("1", "1.5", "-0.1", "nan"):
        with pytest.raises(utils.LabError, match="lora.dropout"):
            utils.parse_config(lora, [f"lora.dropout={bad}"], fractions=("lora.dropout",))
    limit = utils.parse_config(NUMBERS, ["limit=1e3"], **RANGES)["limit"]
    assert limit == 1000 and isinstance(limit, int)
    assert utils.parse_config(NUMBERS, ["limit=none"], **RANGES)["limit"] is None


@pytest.mark.parametrize("script", ["exercise_1", "exercise_2", "exercise_3"])
def test_every_number_in_every_config_has_a_range(script):
    """A numeric key without a range would take NaN, a negative size or a fraction of an example."""
    import importlib

    module = importlib.import_module(script)
    ranged = {*module.POSITIVE, *getattr(module, "NON_NEGATIVE", ()), *getattr(module, "FRACTIONS", ()), "seed"}
    for key, default in utils.flatten(module.CONFIG).items():
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        counted = default is None and key.startswith("max_")
        if numeric or counted:
            assert key in ranged, f"{script}: {key} has no range"
        if counted:
            assert key in module.INTEGERS, f"{script}: {key} counts things but may be fractional"


@pytest.mark.parametrize("script, argument, fragment", [
    ("exercise_2", "lora.dropout=1", "'lora.dropout' must be in [0, 1), got 1.0"),
    ("exercise_2", "weight_decay=-0.1", "'weight_decay' must be >= 0"),
    ("exercise_2", "warmup=nan", "bad value 'nan' for 'warmup'"),
    ("exercise_2", "max_grad_norm=-1", "'max_grad_norm' must be >= 0"),
    ("exercise_2", "learning_rate=inf", "bad value 'inf' for 'learning_rate'"),
    ("exercise_2", "max_steps=0.5", "bad value 0.5 for 'max_steps': expected a whole number"),
    ("exercise_2", "num_train_epochs=-1", "'num_train_epochs' must be > 0"),
    ("exercise_3", "num_sample_images=-1", "'num_sample_images' must be >= 0"),
    ("exercise_3", "dataloader_num_workers=-2", "dataloader_num_workers must be auto or a whole number >= 0"),
    ("exercise_3", "max_classes=nan", "bad value 'nan' for 'max_classes'"),
    ("exercise_3", "lora.dropout=-0.5", "'lora.dropout' must be in [0, 1)"),
    ("exercise_3", "lora.learning_rate=nan", "bad value 'nan' for 'lora.learning_rate'"),
    ("exercise_1", "svc_C=nan", "bad value 'nan' for 'svc_C'"),
    ("exercise_1", "C_grid=0.1,inf", "bad value '0.1,inf' for 'C_grid'"),
    ("exercise_1", "max_eval_samples=many", "bad value 'many' for 'max_eval_samples'"),
])
def test_each_exercise_refuses_bad_numbers_before_loading_anything(tmp_path, script, argument, fragment):
    import importlib

    with pytest.raises(utils.LabError) as error:
        importlib.import_module(script).main([argument, f"output_dir={tmp_path / 'runs'}", "dataset=/no/such/data"])
    assert fragment in str(error.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script, argument, fragment", [
    ("exercise_1.py", "max_train_samples=nan", "bad value 'nan' for 'max_train_samples'"),
    ("exercise_1.py", "seed=-1", "'seed' must be in [0, 4294967295]"),
    ("exercise_1.py", "quantize=int4", "bad value 'int4' for 'quantize'; choose from [None, 'int8']"),
    ("exercise_2.py", "lora.dropout=nan", "bad value 'nan' for 'lora.dropout'"),
    ("exercise_3.py", "warmup=-1", "'warmup' must be >= 0"),
])
def test_bad_numbers_exit_2_with_one_line(tmp_path, script, argument, fragment):
    result = subprocess.run([sys.executable, script, argument, f"output_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0
    assert fragment in result.stderr
