"""The results report: every results.json below a runs folder -> REPORT.md, PNGs and TensorBoard text.

    python report.py runs                   # REPORT.md in runs/
    tensorboard --logdir runs               # the report is under the "report" run, Text tab

REPORT.md has one table per exercise (a row per run, stage and split), a comparison across exercises
(frozen features + SVC vs fine-tuning vs LoRA; CLIP zero-shot vs LoRA) with `comparison.png`, and for
every sweep (a `sweep.json` written by sweep.py) an ablation table with `ablation-<sweep>.png`.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import plots
import report_exercise_3
from evaluate import RESULTS_FILE
from tables import markdown_table
from utils import LabError, flatten, run_cli

SWEEP_FILE = "sweep.json"
REPORT_FILE = "REPORT.md"

# How each exercise's stages read in the comparison; the second element is the stage a gain is measured from.
APPROACHES = {
    ("exercise_1", "svc"): ("frozen features + SVC", None),
    ("exercise_1", "logreg"): ("frozen features + logistic regression", None),
    ("exercise_2", "pretrained"): ("pretrained, untrained head", None),
    ("exercise_2", "fine_tuned"): ("full fine-tuning", "pretrained"),
    ("exercise_3", "zero_shot"): ("CLIP zero-shot", None),
    ("exercise_3", "linear_probe_all"): ("CLIP linear probe (frozen image features)", "zero_shot"),
    ("exercise_3", "lora"): ("CLIP + LoRA", "zero_shot"),
    ("exercise_3", "fine_tuned"): ("CLIP, every weight fine-tuned", "zero_shot"),
}
# Stages whose scores come from a model in which no transformer weight was trained.
FROZEN_STAGES = ("svc", "logreg", "pretrained", "zero_shot")
# Config keys that say where and how a run is logged, not what it computes: never a difference worth showing.
BOOKKEEPING_KEYS = ("output_dir", "run_name", "overwrite", "resume", "wandb_mode", "wandb_project", "tensorboard")
# The stages a run is judged by, the best on validation counting (otherwise its last stage).
JUDGED_STAGES = {"exercise_1": ("svc", "logreg"), "exercise_2": ("fine_tuned",), "exercise_3": ("lora", "fine_tuned")}


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------

def read_json(path: Path, problem) -> dict | None:
    """A JSON file's contents, or None after a warning naming it when it cannot be read or `problem(contents)`
    finds something wrong: one broken run never stops the report."""
    try:
        contents = json.loads(path.read_text(encoding="utf-8"))
        reason = problem(contents)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = str(error)
    if reason:
        print(f"warning: skipping {path}: {reason}; the report leaves it out (rerun what wrote it, or delete it)",
              file=sys.stderr)
        return None
    return contents


def results_problem(results) -> str | None:
    """What makes a results.json unusable for the report, or None."""
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        return "expected an object with a 'metrics' object (stage -> split -> metric -> number)"
    for key in ("config", "model", "timing"):
        if not isinstance(results.get(key, {}), dict):
            return f"expected '{key}' to be an object, found {type(results[key]).__name__}"
    for stage, splits in results["metrics"].items():
        for split, values in (splits.items() if isinstance(splits, dict) else [(None, None)]):
            if not isinstance(values, dict) or not all(
                    value is None or isinstance(value, (int, float)) and not isinstance(value, bool)
                    for value in values.values()):
                return f"metrics of stage {stage!r} split {split!r} are not numbers"
    return None


def sweep_problem(sweep) -> str | None:
    if not isinstance(sweep, dict) or not isinstance(sweep.get("axes"), dict) or not isinstance(sweep.get("points"), list):
        return "expected an object with 'axes' and 'points' (as sweep.py writes it)"
    if not all(isinstance(point, dict) and isinstance(point.get("overrides"), dict) and "name" in point and "status" in point
               for point in sweep["points"]):
        return "every point needs 'name', 'status' and 'overrides'"
    return None


def readable(folder: Path, name: str, problem):
    """(path, contents) of every file `name` below `folder` that reads whole (read_json warns about the others)."""
    for path in sorted(Path(folder).rglob(name)):
        contents = read_json(path, problem)
        if contents is not None:
            yield path, contents


def load_runs(folder: Path) -> list[dict]:
    """Every readable results.json below `folder`, each with `run` (its folder relative to `folder`)."""
    return [{**results, "run": path.parent.relative_to(folder).as_posix() if path.parent != Path(folder) else
             path.parent.name, "path": str(path)} for path, results in readable(folder, RESULTS_FILE, results_problem)]


def load_sweeps(folder: Path) -> list[dict]:
    return [{**sweep, "name": path.parent.name, "folder": path.parent}
            for path, sweep in readable(folder, SWEEP_FILE, sweep_problem)]


def validation_accuracy(results: dict, stage: str) -> float | None:
    return (((results.get("metrics") or {}).get(stage) or {}).get("validation") or {}).get("accuracy")


def final_stage(results: dict) -> str | None:
    """The stage a run is judged by: of its trained stages (exercise 1: both classifiers) the one best on
    validation, so a sweep of exercise 1 ranks a point by LogReg when LogReg beat the SVC."""
    metrics = results.get("metrics") or {}
    stages = [stage for stage in JUDGED_STAGES.get(results.get("exercise"), ()) if stage in metrics]
    stages = stages or list(metrics)[-1:]
    return max(stages, key=lambda stage: validation_accuracy(results, stage) or -1.0, default=None)


def short_name(value) -> str:
    """Hub ids as they are; local paths by their last two components."""
    text = str(value) if value is not None else "-"
    if text.startswith(("/", "~", ".")):
        return "/".join(Path(text.rstrip("/")).parts[-2:])
    return text


def approach(run: dict, stage: str) -> tuple[str, str | None]:
    label, baseline = APPROACHES.get((run.get("exercise"), stage), (stage, None))
    lora = (run.get("config") or {}).get("lora") or {}
    if run.get("exercise") == "exercise_2" and stage == "fine_tuned" and lora.get("enabled"):
        label = "LoRA fine-tuning"
    return label, baseline


def frozen_stage(stage: str) -> bool:
    """Whether no transformer weight was trained behind a stage's scores (exercise 3's linear probes too)."""
    return stage in FROZEN_STAGES or stage.startswith("linear_probe_")


def parameter_counts(run: dict, stage: str) -> tuple[int | None, int | None]:
    """(trainable, total) transformer parameters behind a stage's scores: `parameters` counts the model as
    trained (adapters included); frozen stages have 0 trainable and use the model as loaded
    (`base_parameters`, exercise 3, where adapters are added after its frozen stage)."""
    model = run.get("model") or {}
    frozen = frozen_stage(stage)
    total = model.get("base_parameters", model.get("parameters")) if frozen else model.get("parameters")
    return (0 if frozen else model.get("trainable_parameters")), total


def stage_seconds(timing: dict, stage: str) -> float | None:
    """Time spent on a stage: its own timing phase, or training plus evaluation for trained stages."""
    if stage in timing:
        return timing[stage]
    if not frozen_stage(stage):
        phases = [timing[phase] for phase in ("train", "evaluate") if phase in timing]
        return sum(phases) if phases else None
    return None


def peak_memory_mb(run: dict) -> float | None:
    """A recorded peak memory (keys like peak_memory_mb / peak_rss_bytes at the top level or one
    level down), in MB; None when the run recorded none."""
    candidates = [run, *(value for value in run.values() if isinstance(value, dict))]
    for section in candidates:
        for key, value in section.items():
            lowered = key.lower()
            if "peak" in lowered and ("mem" in lowered or "rss" in lowered) and isinstance(value, (int, float)):
                return value / 2 ** 20 if lowered.endswith("bytes") else float(value)
    return None


def headline_split(splits: dict) -> str:
    return "test" if "test" in splits else "validation" if "validation" in splits else next(iter(splits))


def stage_rows(run: dict) -> list[dict]:
    """One row per (stage, split) of a run, with everything the tables show."""
    rows = []
    timing = run.get("timing") or {}
    for stage, splits in (run.get("metrics") or {}).items():
        trainable, total = parameter_counts(run, stage)
        for split, values in splits.items():
            rows.append({
                "run": run["run"], "exercise": run.get("exercise", "?"),
                "model": short_name((run.get("model") or {}).get("name") or (run.get("config") or {}).get("model_name")),
                "data": short_name((run.get("config") or {}).get("dataset")),
                "stage": stage, "split": split, "accuracy": values.get("accuracy"), "f1_macro": values.get("f1_macro"),
                "top5": values.get("top5_accuracy", values.get("top_5_accuracy")),
                "seconds": stage_seconds(timing, stage), "trainable": trainable, "total": total,
                "peak_memory_mb": peak_memory_mb(run),
            })
    return rows


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def fmt(value, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "count":
        return f"{int(value):,}"
    if kind == "seconds":
        return f"{value:.1f}"
    if kind == "signed":
        return f"{value:+.4f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def differing_settings(runs: list[dict]) -> dict[str, str]:
    """Per run: its values of the config keys that differ between the runs compared ("key=value, ...")."""
    configs = {run["run"]: flatten(run.get("config") or {}) for run in runs}
    keys = set().union(*configs.values()) - set(BOOKKEEPING_KEYS)
    varying = sorted(key for key in keys
                     if len({json.dumps(config.get(key), sort_keys=True, default=str) for config in configs.values()}) > 1)
    return {run: ", ".join(f"{key}={short_name(config.get(key))}" for key in varying) for run, config in configs.items()}


def exercise_table(rows: list[dict], settings: dict | None = None) -> str:
    """One row per run, stage and split; `settings`: each run's differing config values, as a last column."""
    has_top5 = any(row["top5"] is not None for row in rows)
    has_memory = any(row["peak_memory_mb"] is not None for row in rows)
    has_settings = any((settings or {}).values())
    headers = ["run", "model", "data", "stage", "split", "accuracy", "macro F1", *(["top-5"] if has_top5 else []),
               "time (s)", "trainable / total params", *(["peak memory (MB)"] if has_memory else []),
               *(["settings that differ"] if has_settings else [])]
    body = []
    for row in rows:
        body.append([fmt(row["run"]), fmt(row["model"]), fmt(row["data"]), row["stage"], row["split"],
                     fmt(row["accuracy"]), fmt(row["f1_macro"]), *([fmt(row["top5"])] if has_top5 else []),
                     fmt(row["seconds"], "seconds"), f"{fmt(row['trainable'], 'count')} / {fmt(row['total'], 'count')}",
                     *([fmt(row["peak_memory_mb"], "seconds")] if has_memory else []),
                     *([fmt(settings.get(row["run"]) or "-")] if has_settings else [])])
    return markdown_table(headers, body)


def comparison_rows(runs: list[dict]) -> list[dict]:
    """Per (approach, model, data): the run best on validation, scored on test (validation if no test)."""
    best = {}
    for run in runs:
        metrics = run.get("metrics") or {}
        for stage, splits in metrics.items():
            if (run.get("exercise"), stage) not in APPROACHES:   # few-shot probes, interpolation scales: their own section
                continue
            label, baseline = approach(run, stage)
            model = short_name((run.get("model") or {}).get("name"))
            data = short_name((run.get("config") or {}).get("dataset"))
            split = headline_split(splits)
            selection = (splits.get("validation") or splits[split]).get("accuracy") or 0.0
            trainable, total = parameter_counts(run, stage)
            gain = None
            if baseline in metrics and split in metrics[baseline]:
                gain = splits[split].get("accuracy", 0.0) - metrics[baseline][split].get("accuracy", 0.0)
            row = {"approach": label, "exercise": run.get("exercise", "?"), "model": model, "data": data,
                   "split": split, "accuracy": splits[split].get("accuracy"), "f1_macro": splits[split].get("f1_macro"),
                   "gain": gain, "trainable": trainable, "total": total,
                   "seconds": stage_seconds(run.get("timing") or {}, stage),
                   "run_seconds": (run.get("timing") or {}).get("total"), "run": run["run"], "selection": selection}
            key = (label, model, data)
            if key not in best or selection > best[key]["selection"]:
                best[key] = row
    return sorted(best.values(), key=lambda row: (row["data"], row["exercise"], row["accuracy"] or 0.0))


def comparison_table(rows: list[dict]) -> str:
    headers = ["approach", "exercise", "model", "data", "split", "accuracy", "macro F1", "vs. baseline",
               "trainable / total params", "stage time (s)", "run total (s)", "run"]
    body = [[row["approach"], row["exercise"], fmt(row["model"]), fmt(row["data"]), row["split"], fmt(row["accuracy"]),
             fmt(row["f1_macro"]), fmt(row["gain"], "signed"),
             f"{fmt(row['trainable'], 'count')} / {fmt(row['total'], 'count')}", fmt(row["seconds"], "seconds"),
             fmt(row["run_seconds"], "seconds"), fmt(row["run"])] for row in rows]
    return markdown_table(headers, body)


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------

def ablation_rows(sweep: dict, runs_by_path: dict) -> list[dict]:
    """One row per sweep point: its values, status, and the final stage's validation / test scores
    (from `runs_by_path`: the loaded runs keyed by their results.json path)."""
    rows = []
    for point in sweep.get("points", []):
        row = {"name": point["name"], "values": point["overrides"], "status": point["status"],
               "error": point.get("error"), "validation": None, "test": None, "f1_macro": None, "seconds": None}
        results = runs_by_path.get(str(sweep["folder"] / point["name"] / RESULTS_FILE))  # inside the sweep folder
        if results:
            metrics = results.get("metrics") or {}
            stage = final_stage(results)
            splits = metrics.get(stage) or {}
            row.update(stage=stage, validation=(splits.get("validation") or {}).get("accuracy"),
                       test=(splits.get("test") or {}).get("accuracy"),
                       f1_macro=(splits.get(headline_split(splits)) or {}).get("f1_macro") if splits else None,
                       seconds=(results.get("timing") or {}).get("total"))
        rows.append(row)
    return rows


def ablation_table(sweep: dict, rows: list[dict]) -> str:
    axes = list(sweep["axes"])
    scored = [row for row in rows if row["validation"] is not None]
    best = max(scored, key=lambda row: row["validation"])["name"] if scored else None
    headers = [*axes, "status", "validation accuracy", "test accuracy", "macro F1", "time (s)", "judged stage"]
    body = []
    for row in rows:
        status = row["status"] if row["status"] == "ok" else f"failed: {fmt(row['error'])[:120]}"
        cells = [fmt(row["values"].get(axis)) for axis in axes]
        scores = [fmt(row["validation"]), fmt(row["test"]), fmt(row["f1_macro"]), fmt(row["seconds"], "seconds")]
        if row["name"] == best:
            scores[0] = f"**{scores[0]}**"
        body.append([*cells, status, *scores, fmt(row.get("stage"))])
    return markdown_table(headers, body)


# ---------------------------------------------------------------------------------------------
# Most confident mistakes, from each run's per-sample predictions files (evaluate.write_predictions)
# ---------------------------------------------------------------------------------------------

def confident_mistakes(run: dict, top: int = 3) -> list[dict]:
    """Up to `top` wrong predictions with the highest scores, from the predictions file of the run's stage best
    on validation, on test where it has one (none without that file; a warning when it is damaged)."""
    from evaluate import PREDICTIONS_DIR, read_predictions

    metrics = {stage: splits for stage, splits in (run.get("metrics") or {}).items() if splits}
    if not metrics:
        return []
    stage = max(metrics, key=lambda name: (metrics[name].get("validation") or {}).get("accuracy") or 0.0)
    split = headline_split(metrics[stage])
    path = Path(run["path"]).parent / PREDICTIONS_DIR / f"{stage}_{split}.csv"
    try:
        wrong = [row for row in read_predictions(path) if row["label"] != row["predicted"]] if path.exists() else []
    except LabError as error:
        print(f"warning: {error}; the report leaves out the mistakes of {run['run']}", file=sys.stderr)
        return []
    return [{**row, "stage": stage, "split": split} for row in sorted(wrong, key=lambda row: -row["score"])[:top]]


def mistakes_section(runs: list[dict], top: int = 3) -> list[str]:
    """REPORT.md lines: a table of every run's most confident mistakes (nothing when no run has any)."""
    body = []
    for run in runs:
        for row in confident_mistakes(run, top):
            text = short_name(row["input"]) if row["input"].startswith("/") else row["input"]
            text = text if len(text) <= 90 else text[:87] + "..."
            body.append([fmt(run["run"]), f"{row['stage']} / {row['split']}", fmt(text), fmt(row["label"]),
                         fmt(row["predicted"]), fmt(row["score"])])
    if not body:
        return []
    return ["", "## Most confident mistakes", "", f"Per run, the {top} wrong predictions it was surest of (its stage "
            "best on validation; score: the predicted class's probability, an SVC's margin), from "
            "`<run>/predictions/<stage>_<split>.csv`.", "",
            markdown_table(["run", "stage / split", "input", "true", "predicted", "score"], body)]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def build_report(folder: Path) -> tuple[str, list[Path]]:
    """REPORT.md text and the PNGs written next to it."""
    folder = Path(folder)
    runs = load_runs(folder)
    sweeps = load_sweeps(folder)
    images = []
    sections = [f"# Results report: {folder}", "",
                f"{len(runs)} runs, {len(sweeps)} sweeps. Accuracy and macro F1 per stage and split; time is the "
                f"stage's own phase (training + evaluation for trained stages); parameters are the transformer's "
                f"(0 trainable where its weights stayed frozen)."]
    for exercise in sorted({run.get("exercise", "?") for run in runs}):
        exercise_runs = [run for run in runs if run.get("exercise", "?") == exercise]
        rows = [row for run in exercise_runs for row in stage_rows(run)]
        sections += ["", f"## {exercise}", "", exercise_table(rows, differing_settings(exercise_runs))]
        if exercise == "exercise_3":
            sections += report_exercise_3.section(exercise_runs, folder, fmt)
    comparison = comparison_rows(runs)
    if comparison:
        sections += ["", "## Comparison across exercises", "",
                     "Best run per approach, model and data, chosen by validation accuracy and scored on test "
                     "(validation where there is no test split). `vs. baseline`: fine-tuned minus pretrained, "
                     "LoRA minus zero-shot, within the same run.", "", comparison_table(comparison)]
        image = plots.plot_comparison(comparison, folder / "comparison.png")
        if image:
            images.append(image)
            sections += ["", f"![comparison]({image.name})"]
    sections += mistakes_section(runs)
    runs_by_path = {run["path"]: run for run in runs}
    for sweep in sweeps:
        rows = ablation_rows(sweep, runs_by_path)
        failed = sum(row["status"] != "ok" for row in rows)
        sections += ["", f"## Sweep `{sweep['name']}` ({Path(sweep['script']).name})", "",
                     f"{len(rows)} points, {failed} failed. Fixed: "
                     + (", ".join(f"`{k}={v}`" for k, v in sweep.get("fixed", {}).items()) or "nothing")
                     + ". Scores are the final stage's; best validation accuracy in bold.", "",
                     ablation_table(sweep, rows)]
        image = plots.plot_ablation(sweep, rows, folder / f"ablation-{sweep['name']}.png")
        if image:
            images.append(image)
            sections += ["", f"![ablation {sweep['name']}]({image.name})"]
    return "\n".join(sections) + "\n", images


def log_to_tensorboard(folder: Path, markdown: str) -> Path:
    """The report as TensorBoard text under <folder>/tensorboard/report (replacing an older one)."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(folder) / "tensorboard" / "report"
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.add_text("report", markdown)
    return log_dir


def write_report(folder, tensorboard: bool = True) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise LabError(f"runs folder {folder} does not exist" if not folder.exists() else
                       f"{folder} is a file; give the folder that holds the runs")
    path = folder / REPORT_FILE
    if path.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise LabError(f"cannot write the report to {path}: {'a folder is in the way' if path.is_dir() else 'not writable'}")
    markdown, images = build_report(folder)
    path.write_text(markdown)
    if tensorboard:
        log_to_tensorboard(folder, markdown)
    print(f"wrote {path}" + (f" and {', '.join(image.name for image in images)}" if images else ""))
    return path


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    flags = [arg for arg in argv[1:] if arg.startswith("-")]
    unknown = [flag for flag in flags if flag != "--no-tensorboard"]
    if unknown or len(argv) - len(flags) > 1:
        raise LabError(f"unexpected argument {(unknown or argv[1:])[0]!r}; usage: python report.py <runs folder> "
                       f"[--no-tensorboard]")
    write_report(argv[0], tensorboard="--no-tensorboard" not in flags)
    return 0


if __name__ == "__main__":
    run_cli(main)
