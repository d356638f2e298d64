"""Sweep grid expansion, run naming, failure continuation and the W&B export (sweep.py)."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

import report
import sweep
import utils
from conftest import ROOT

# A stand-in exercise: fails while running for learning_rate=9 (as a diverging run would), else writes a
# results.json whose accuracy is a known function of the swept values, so the summary and the report can
# be checked exactly.
FAKE_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    CONFIG = {"learning_rate": 1e-5, "batch_size": 16, "output_dir": "runs", "run_name": None,
              "lora": {"target_modules": ["query", "value"]}}
    args = dict(arg.split("=", 1) for arg in sys.argv[1:])
    if args["learning_rate"] == "9":
        print("error: the loss became NaN at step 3", file=sys.stderr)
        raise SystemExit(2)
    run_dir = Path(args["output_dir"]) / args["run_name"]
    run_dir.mkdir(parents=True)
    accuracy = 0.5 + float(args["learning_rate"]) * 1000 + int(args["batch_size"]) / 1000
    metrics = {"pretrained": {"validation": {"accuracy": 0.5, "f1_macro": 0.4}},
               "fine_tuned": {"validation": {"accuracy": accuracy, "f1_macro": accuracy - 0.1},
                              "test": {"accuracy": accuracy - 0.01, "f1_macro": accuracy - 0.11}}}
    results = {"exercise": "exercise_2", "config": args, "metrics": metrics, "timing": {"total": 2.0},
               "model": {"name": "fake", "parameters": 100, "trainable_parameters": 100}}
    (run_dir / "results.json").write_text(json.dumps(results))
''')


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "fake_exercise.py"
    path.write_text(FAKE_SCRIPT)
    return str(path)


def test_split_values_respects_brackets():
    assert sweep.split_values("1e-5,3e-5, 5e-5") == ["1e-5", "3e-5", "5e-5"]
    assert sweep.split_values("[query],[query,value]") == ["[query]", "[query,value]"]
    assert sweep.split_values("[query,value]") == ["[query,value]"]
    assert sweep.split_values("cls") == ["cls"]


def test_parse_grid_axes_fixed_and_list_keys(fake_script):
    defaults = sweep.script_defaults(fake_script)
    assert defaults["lora.target_modules"] == ["query", "value"] and defaults["batch_size"] == 16
    axes, fixed = sweep.parse_grid(
        ["learning_rate=1e-5,3e-5", "batch_size=16", "lora.target_modules=query,value", "C=[1,2],[3]"], defaults)
    assert axes == {"learning_rate": ["1e-5", "3e-5"], "C": ["[1,2]", "[3]"]}
    # a list-valued key given a plain comma list is one value, not an axis
    assert fixed == {"batch_size": "16", "lora.target_modules": "query,value"}
    axes, _ = sweep.parse_grid(["lora.target_modules=[query],[query,value]"], defaults)
    assert axes == {"lora.target_modules": ["[query]", "[query,value]"]}
    with pytest.raises(utils.LabError, match="output_dir"):
        sweep.parse_grid(["output_dir=a,b"], defaults)
    with pytest.raises(utils.LabError, match="not key=value"):
        sweep.parse_grid(["learning_rate"], defaults)
    with pytest.raises(utils.LabError, match="twice"):
        sweep.parse_grid(["batch_size=16,16"], defaults)


def test_expand_grid_and_names():
    points = sweep.expand_grid({"learning_rate": ["1e-5", "3e-5"], "batch_size": ["16", "32"], "pooling": ["cls", "mean"]})
    assert len(points) == 8
    assert points[0] == {"learning_rate": "1e-5", "batch_size": "16", "pooling": "cls"}
    assert points[1] == {"learning_rate": "1e-5", "batch_size": "16", "pooling": "mean"}  # last key fastest
    names = sweep.point_names("base", points)
    assert names[0] == "base-learning_rate=1e-5-batch_size=16-pooling=cls"
    assert len(set(names)) == 8
    odd = sweep.point_names("b", [{"model_name": "/models/a/mini"}, {"model_name": "/other/mini"},
                                  {"lora.target_modules": "[query,value]"}])
    assert odd == ["b-model_name=mini", "b-model_name=mini-2", "b-lora.target_modules=query+value"]


def test_sweep_continues_after_a_failed_point(fake_script, tmp_path, capsys):
    out = tmp_path / "runs"
    code = sweep.main([fake_script, "learning_rate=1e-4,9,2e-4", "batch_size=16,32",
                       f"output_dir={out}", "run_name=grid"])
    assert code == 1  # some points failed
    summary = json.loads((out / "grid" / "sweep.json").read_text())
    assert [point["status"] for point in summary["points"]] == ["ok", "ok", "failed", "failed", "ok", "ok"]
    assert summary["axes"] == {"learning_rate": ["1e-4", "9", "2e-4"], "batch_size": ["16", "32"]}
    failed = summary["points"][2]
    assert failed["name"] == "grid-learning_rate=9-batch_size=16" and failed["returncode"] == 2
    assert failed["error"] == "error: the loss became NaN at step 3"
    ok = summary["points"][5]
    assert ok["name"] == "grid-learning_rate=2e-4-batch_size=32"
    results = json.loads((out / "grid" / ok["name"] / "results.json").read_text())
    assert results["config"]["learning_rate"] == "2e-4" and results["config"]["batch_size"] == "32"
    assert (out / "grid" / "logs" / f"{failed['name']}.log").exists()
    printed = capsys.readouterr().out
    assert "4 of 6 runs ok, 2 failed" in printed and "grid-learning_rate=9-batch_size=32" in printed
    best = 0.5 + 2e-4 * 1000 + 32 / 1000
    # each point's score as it finishes, and the ranking at the end
    assert f"[6/6] grid-learning_rate=2e-4-batch_size=32: fine_tuned validation accuracy {best:.4f}" in printed
    ranking = printed[printed.index("rank"):].splitlines()       # a header, its rule, then the points
    assert ranking[2].split()[:3] == ["1", "grid-learning_rate=2e-4-batch_size=32", f"{best:.4f}"]
    assert ranking[7].split()[1:3] == ["grid-learning_rate=9-batch_size=32", "failed"]

    # the report renders the sweep: every point, the failures, the best point in bold, a plot
    text = report.write_report(out, tensorboard=False).read_text()
    section = text.split("## Sweep `grid`")[1]
    assert "6 points, 2 failed" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "status" not in line and "---" not in line]
    assert len(rows) == 6
    best = 0.5 + 2e-4 * 1000 + 32 / 1000
    assert f"| 2e-4 | 32 | ok | **{best:.4f}** | {best - 0.01:.4f} |" in section
    assert sum("failed: " in row for row in rows) == 2
    assert (out / "ablation-grid.png").stat().st_size > 0


def test_bad_values_are_refused_before_the_first_run(fake_script, tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(utils.LabError, match=r"sweep point g-learning_rate=bad: bad value 'bad' for 'learning_rate'"):
        sweep.run_sweep(fake_script, ["learning_rate=1e-4,bad", f"output_dir={out}", "run_name=g"])
    with pytest.raises(utils.LabError, match=r"sweep point .*pooling=max: .*choose from \['cls', 'mean'\]"):
        sweep.run_sweep(str(ROOT / "exercise_1.py"), ["pooling=cls,max", f"output_dir={out}"])
    with pytest.raises(utils.LabError, match=r"unknown config key 'learning_rat'"):
        sweep.run_sweep(str(ROOT / "exercise_2.py"), ["learning_rat=1e-5,3e-5", f"output_dir={out}"])
    assert not out.exists(), "nothing runs and nothing is written"


def test_the_wandb_metric_is_one_the_exercise_logs(tmp_path):
    for script, metric in (("exercise_1.py", "svc/validation/accuracy"),
                           ("exercise_2.py", "fine_tuned/validation/accuracy"),
                           ("exercise_3.py", "lora/validation/accuracy")):
        assert sweep.WANDB_METRICS[script.removesuffix(".py")] == metric
    # exercise 1 logs it under that name (tests/test_exercise_1.py reads it back from TensorBoard)


def test_wandb_sweep_config(fake_script, tmp_path):
    out = tmp_path / "runs"
    sweep.run_sweep(fake_script, ["learning_rate=1e-4,2e-4", "batch_size=16", "lora.target_modules=[query,value]",
                                  f"output_dir={out}", "run_name=w"])
    text = (out / "w" / "wandb_sweep.yaml").read_text()
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(text)
    assert config["method"] == "grid" and config["program"] == "fake_exercise.py"
    assert config["parameters"]["learning_rate"] == {"values": ["1e-4", "2e-4"]}
    assert config["parameters"]["batch_size"] == {"value": 16}
    assert config["parameters"]["lora.target_modules"] == {"value": "[query,value]"}
    assert "output_dir" not in config["parameters"] and config["command"][-1] == "${args_no_hyphens}"


def test_existing_sweep_folder_is_not_mixed(fake_script, tmp_path):
    out = tmp_path / "runs"
    for _ in range(2):
        sweep.run_sweep(fake_script, ["learning_rate=1e-4,2e-4", "batch_size=16", f"output_dir={out}", "run_name=s"])
    second = json.loads((out / "s-2" / "sweep.json").read_text())
    assert [point["name"] for point in second["points"]] == ["s-2-learning_rate=1e-4", "s-2-learning_rate=2e-4"]
    assert all(point["status"] == "ok" for point in second["points"])


def test_command_line(fake_script, tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "sweep.py", fake_script, "batch_size=16"], capture_output=True, text=True,
                          cwd=str(utils.Path(sweep.__file__).parent))
    assert done.returncode == 2 and "nothing to sweep" in done.stderr
    done = subprocess.run([sys.executable, "sweep.py", fake_script, "batch_size=16,32", "--dryrun"], capture_output=True,
                          text=True, cwd=str(utils.Path(sweep.__file__).parent))
    assert done.returncode == 2 and done.stderr.startswith("error: unknown flag '--dryrun'")
    done = subprocess.run([sys.executable, "sweep.py", fake_script, "learning_rate=1e-4,2e-4", "--dry-run",
                           f"output_dir={tmp_path}"], capture_output=True, text=True,
                          cwd=str(utils.Path(sweep.__file__).parent))
    commands = done.stdout.splitlines()
    assert done.returncode == 0 and len(commands) == 2
    assert commands[1].split()[2] == "learning_rate=2e-4" and commands[1].endswith("-learning_rate=2e-4")
    assert [path.name for path in tmp_path.iterdir()] == ["fake_exercise.py"]  # a dry run writes nothing
