"""Grid sweeps: run an exercise once per combination of config values, each run its own process.

    python sweep.py exercise_2.py learning_rate=1e-5,3e-5,5e-5 batch_size=16,32 max_steps=200
    python sweep.py exercise_1.py svc_C=0.1,1,10 pooling=cls,mean run_name=svc-grid
    python sweep.py exercise_2.py learning_rate=1e-5,3e-5 --dry-run     # print the commands only
    python report.py runs/svc-grid                                      # ablation table and plot

A value with commas is a grid axis; a single value goes to every run unchanged. For list-valued keys
(`C_grid`, `lora.target_modules`) a plain comma list is one value and bracketed lists are the axis:
`lora.target_modules=[query],[query,value]`. The runs go to `<output_dir>/<run_name>/`, named
`<run_name>-<key>=<value>-...`. Every point's keys and values are checked as the script checks them before
the first run starts; a point that fails while running (a crash, out of memory) does not stop the others.
Each point prints its validation accuracy as it finishes (of the stage it is judged by: exercise 1's better
classifier, the trained stage of exercises 2 and 3), and the sweep ends with the points ranked.
`sweep.json` in the sweep folder lists every point with its status, score, command and log (the report
reads it), `logs/` holds each run's output, and `wandb_sweep.yaml` is the same grid as a W&B sweep config
(`wandb sweep wandb_sweep.yaml`, then `wandb agent <id>`) maximising a metric the script logs
(`svc/validation/accuracy`, `fine_tuned/validation/accuracy`, `lora/validation/accuracy`; `--metric=` to change).
"""
from __future__ import annotations

import ast
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import report
import tables
import utils
from evaluate import RESULTS_FILE

RESERVED_KEYS = ("output_dir", "run_name")  # the sweep sets these for every point
# What each exercise logs (to TensorBoard and W&B) that a W&B sweep can maximise: its lesson's stage on validation.
WANDB_METRICS = {"exercise_1": "svc/validation/accuracy", "exercise_2": "fine_tuned/validation/accuracy",
                 "exercise_3": "lora/validation/accuracy"}


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets: "1e-5,3e-5" -> 2 values, "[q,v],[q]" -> 2 values."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return [value for value in values if value]


def script_defaults(script: str) -> dict:
    """The flattened CONFIG dict literal of an exercise script, read without importing it ({} if none)."""
    try:
        tree = ast.parse(Path(script).read_text())
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if "CONFIG" in targets:
            try:
                return utils.flatten(ast.literal_eval(node.value))
            except ValueError:
                return {}
    return {}


def parse_grid(arguments: list[str], defaults: dict) -> tuple[dict, dict]:
    """key=value arguments -> (axes {key: [values]} in argument order, fixed {key: value})."""
    axes, fixed = {}, {}
    for argument in arguments:
        key, sep, text = argument.partition("=")
        if not sep or not key:
            raise utils.LabError(f"argument {argument!r} is not key=value (e.g. learning_rate=1e-5,3e-5)")
        is_list_key = isinstance(defaults.get(key), list)
        values = split_values(text) if not is_list_key or text.strip().startswith("[") else [text]
        if len(values) > 1 and key in RESERVED_KEYS:
            raise utils.LabError(f"{key} cannot be swept: every point of a sweep goes to <output_dir>/<run_name>/")
        if len(values) > 1:
            if len(set(values)) < len(values):
                raise utils.LabError(f"{key} lists a value twice: {values}")
            axes[key] = values
        else:
            fixed[key] = values[0] if values else text
    return axes, fixed


def check_points(script: str, fixed: dict, points: list[dict], names: list[str]) -> None:
    """Every point's keys and values checked as the script itself will check them, before the first run starts.

    An exercise (a script with a main() behind `if __name__ == "__main__"`) is imported and its own
    parse_config runs on each point; any other script is checked against its CONFIG literal's types."""
    module = _importable(script)
    for point, name in zip(points, names):
        arguments = [f"{key}={value}" for key, value in {**fixed, **point}.items()]
        try:
            if module is not None:
                utils.parse_config(module.CONFIG, arguments, getattr(module, "CHOICES", None),
                                   getattr(module, "POSITIVE", ()), script, non_negative=getattr(module, "NON_NEGATIVE", ()),
                                   fractions=getattr(module, "FRACTIONS", ()), integers=getattr(module, "INTEGERS", ()))
            else:
                utils.parse_config(_unflatten(script_defaults(script)), arguments, script=script)
        except utils.LabError as error:
            raise utils.LabError(f"sweep point {name}: {error}; nothing was run") from None


def _importable(script: str):
    """The script as a module when importing it runs nothing (its work sits behind a __main__ guard), else None."""
    import importlib.util

    tree = ast.parse(Path(script).read_text())
    guarded = any(isinstance(node, ast.If) and "__name__" in ast.dump(node.test) for node in tree.body)
    if not guarded or not any(isinstance(node, ast.Assign) and "CONFIG" in ast.dump(node) for node in tree.body):
        return None
    spec = importlib.util.spec_from_file_location(f"sweep_target_{Path(script).stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unflatten(flat: dict) -> dict:
    nested = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        section = nested
        for parent in parents:
            section = section.setdefault(parent, {})
        section[leaf] = value
    return nested


def expand_grid(axes: dict) -> list[dict]:
    """Every combination, the last key varying fastest: [{key: value, ...}, ...]."""
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def slug(value: str) -> str:
    """A value as it appears in a run folder name: path basenames, lists joined with '+'."""
    value = value.strip().strip("[]")
    if "/" in value:
        value = Path(value.rstrip("/")).name
    value = value.replace(",", "+").replace(" ", "")
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", value) or "none"


def point_names(base: str, points: list[dict]) -> list[str]:
    """`<base>-key=value-key=value` per point; duplicates after slugging get -2, -3 ..."""
    names, seen = [], {}
    for point in points:
        name = "-".join([base, *(f"{key}={slug(value)}" for key, value in point.items())])
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def wandb_sweep_config(script: str, axes: dict, fixed: dict, metric: str) -> str:
    """The grid as a W&B sweep config (YAML); `${args_no_hyphens}` passes key=value as our scripts expect."""
    lines = [f"program: {Path(script).name}", "method: grid", "metric:", f"  name: {metric}", "  goal: maximize",
             "parameters:"]
    for key, values in axes.items():
        lines.append(f"  {key}:\n    values: [{', '.join(_yaml_scalar(v) for v in values)}]")
    for key, value in fixed.items():
        if key not in RESERVED_KEYS:
            lines.append(f"  {key}:\n    value: {_yaml_scalar(value)}")
    lines += ["command:", "  - ${env}", "  - ${interpreter}", "  - ${program}", "  - ${args_no_hyphens}"]
    return "\n".join(lines) + "\n"


def _yaml_scalar(text: str) -> str:
    for cast in (int, float):
        try:
            cast(text)
            return text if cast is int or "." in text else json.dumps(text)  # YAML 1.1 reads 1e-5 as a string
        except ValueError:
            pass
    return json.dumps(text)


def failure_reason(log: Path) -> str:
    """The line of a failed run's output that says why: its `error:` line or the exception, else the last line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [line.split("\r")[-1].strip() for line in text.split("\n\n", 1)[-1].splitlines()]  # after the command
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return line
    return lines[-1] if lines else "no output"


def run_sweep(script: str, arguments: list[str], dry_run: bool = False, metric: str | None = None,
              python: str = sys.executable) -> dict:
    """Run every grid point of `script` as a subprocess; return (and write) the sweep summary."""
    if not Path(script).is_file():
        raise utils.LabError(f"script {script!r} not found")
    defaults = script_defaults(script)
    axes, fixed = parse_grid(arguments, defaults)
    if not axes:
        raise utils.LabError("nothing to sweep: give at least one key with several comma-separated values, "
                             "e.g. learning_rate=1e-5,3e-5")
    points = expand_grid(axes)
    output_dir = fixed.pop("output_dir", defaults.get("output_dir", "runs"))
    base = fixed.pop("run_name", None) or f"{Path(script).stem}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    check_points(script, fixed, points, point_names(base, points))
    metric = metric or WANDB_METRICS.get(Path(script).stem, "eval/accuracy")
    if dry_run:
        sweep_dir = Path(output_dir) / base
    else:
        sweep_dir = utils.prepare_run_dir(output_dir, base, "sweep")
        (sweep_dir / "wandb_sweep.yaml").write_text(wandb_sweep_config(script, axes, fixed, metric))
    names = point_names(sweep_dir.name, points)
    summary = {"script": script, "sweep_dir": str(sweep_dir), "axes": axes, "fixed": fixed,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "points": []}
    for index, (point, name) in enumerate(zip(points, names), 1):
        command = [python, script, *(f"{k}={v}" for k, v in {**fixed, **point}.items()),
                   f"output_dir={sweep_dir}", f"run_name={name}"]
        if dry_run:
            print(" ".join(command))
            continue
        record = run_point(command, sweep_dir, name)
        summary["points"].append({"name": name, "overrides": point, **record})
        # after each point: a crash keeps the rest
        (sweep_dir / report.SWEEP_FILE).write_text(json.dumps(summary, indent=2))
        outcome = (f"{record['stage']} validation accuracy {record['validation_accuracy']:.4f}"
                   if record["status"] == "ok" and record["validation_accuracy"] is not None else
                   "ok" if record["status"] == "ok" else f"FAILED (exit {record['returncode']}): {record['error']}")
        print(f"[{index}/{len(points)}] {name}: {outcome} ({record['seconds']:.0f} s)", flush=True)
    if not dry_run:
        print(summary_text(summary))
    return summary


def run_point(command: list[str], sweep_dir: Path, name: str) -> dict:
    log = sweep_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n\n")
        handle.flush()
        returncode = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    results = sweep_dir / name / RESULTS_FILE
    status = "ok" if returncode == 0 and results.exists() else "failed"
    error, stage, accuracy = None, None, None
    if status == "failed":
        error = failure_reason(log) if returncode != 0 else "exited 0 but wrote no results.json"
    else:
        scores = json.loads(results.read_text())
        stage = report.final_stage(scores)
        accuracy = report.validation_accuracy(scores, stage) if stage else None
    return {"status": status, "returncode": returncode, "seconds": round(time.perf_counter() - start, 1),
            "run_dir": str(sweep_dir / name), "log": str(log), "command": command, "error": error,
            "stage": stage, "validation_accuracy": accuracy}


def summary_text(summary: dict) -> str:
    """The points ranked by validation accuracy (failures last), then what failed and why."""
    failed = [point for point in summary["points"] if point["status"] != "ok"]
    ranked = sorted(summary["points"], key=lambda point: -(point.get("validation_accuracy") or -1.0))
    score = lambda point: (f"{point['validation_accuracy']:.4f}" if point.get("validation_accuracy") is not None
                           else point["status"])
    lines = [tables.text_table(["rank", "point", "validation accuracy", "stage"],
                               [[rank, point["name"], score(point), point.get("stage") or "-"]
                                for rank, point in enumerate(ranked, 1)], right=(0, 2))]
    lines += ["", f"sweep {summary['sweep_dir']}: {len(summary['points']) - len(failed)} of "
              f"{len(summary['points'])} runs ok, {len(failed)} failed"]
    lines += [f"  failed: {point['name']} (exit {point['returncode']}; log {point['log']}): {point['error']}"
              for point in failed]
    lines.append(f"report: python report.py {summary['sweep_dir']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    flags = {arg for arg in argv if arg.startswith("--")}
    positional = [arg for arg in argv if not arg.startswith("--")]
    if "--help" in flags or "-h" in argv or not positional:
        print(__doc__)
        return 0
    unknown = [flag for flag in flags if flag not in ("--dry-run", "--help") and not flag.startswith("--metric=")]
    if unknown:
        raise utils.LabError(f"unknown flag {unknown[0]!r}; sweep.py takes --dry-run, --metric=<W&B metric> and --help")
    metric = next((flag.split("=", 1)[1] for flag in flags if flag.startswith("--metric=")), None)
    summary = run_sweep(positional[0], positional[1:], dry_run="--dry-run" in flags, metric=metric)
    return 1 if any(point["status"] != "ok" for point in summary["points"]) else 0


if __name__ == "__main__":
    utils.run_cli(main)
