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
import sys
from pathlib import Path

from evaluate import RESULTS_FILE

SWEEP_FILE = "sweep.json"
REPORT_FILE = "REPORT.md"

# How each exercise's stages read in the comparison; the second element is the stage a gain is measured from.
APPROACHES = {
    ("exercise_1", "svc"): ("frozen features + SVC", None),
    ("exercise_1", "logreg"): ("frozen features + logistic regression", None),
    ("exercise_2", "pretrained"): ("pretrained, untrained head", None),
    ("exercise_2", "fine_tuned"): ("full fine-tuning", "pretrained"),
    ("exercise_3", "zero_shot"): ("CLIP zero-shot", None),
    ("exercise_3", "lora"): ("CLIP + LoRA", "zero_shot"),
    ("exercise_3", "fine_tuned"): ("CLIP, every weight fine-tuned", "zero_shot"),
}
# Stages whose scores come from a model in which no transformer weight was trained.
FROZEN_STAGES = ("svc", "logreg", "pretrained", "zero_shot")
# The stage a sweep point is judged by (otherwise its last stage).
FINAL_STAGE = {"exercise_1": "svc", "exercise_2": "fine_tuned", "exercise_3": "lora"}


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------

def load_runs(folder: Path) -> list[dict]:
    """Every results.json below `folder`, each with `run` (its folder relative to `folder`)."""
    runs = []
    for path in sorted(Path(folder).rglob(RESULTS_FILE)):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        if isinstance(results, dict) and "metrics" in results:
            run = path.parent.relative_to(folder).as_posix()
            runs.append({**results, "run": run if run != "." else path.parent.name, "path": str(path)})
    return runs


def load_sweeps(folder: Path) -> list[dict]:
    sweeps = []
    for path in sorted(Path(folder).rglob(SWEEP_FILE)):
        sweep = json.loads(path.read_text())
        sweeps.append({**sweep, "name": path.parent.name, "folder": path.parent})
    return sweeps


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


def parameter_counts(run: dict, stage: str) -> tuple[int | None, int | None]:
    """(trainable, total) transformer parameters behind a stage's scores: 0 trainable for frozen
    stages, which also use the model as loaded (`parameters`) rather than with adapters added
    (`total_parameters`, exercise 3)."""
    model = run.get("model") or {}
    frozen = stage in FROZEN_STAGES
    total = model.get("parameters") if frozen else model.get("total_parameters", model.get("parameters"))
    return (0 if frozen else model.get("trainable_parameters")), total


def stage_seconds(timing: dict, stage: str) -> float | None:
    """Time spent on a stage: its own timing phase, or training plus evaluation for trained stages."""
    if stage in timing:
        return timing[stage]
    if stage not in FROZEN_STAGES:
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


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def exercise_table(rows: list[dict]) -> str:
    has_top5 = any(row["top5"] is not None for row in rows)
    has_memory = any(row["peak_memory_mb"] is not None for row in rows)
    headers = ["run", "model", "data", "stage", "split", "accuracy", "macro F1", *(["top-5"] if has_top5 else []),
               "time (s)", "trainable / total params", *(["peak memory (MB)"] if has_memory else [])]
    body = []
    for row in rows:
        body.append([fmt(row["run"]), fmt(row["model"]), fmt(row["data"]), row["stage"], row["split"],
                     fmt(row["accuracy"]), fmt(row["f1_macro"]), *([fmt(row["top5"])] if has_top5 else []),
                     fmt(row["seconds"], "seconds"), f"{fmt(row['trainable'], 'count')} / {fmt(row['total'], 'count')}",
                     *([fmt(row["peak_memory_mb"], "seconds")] if has_memory else [])])
    return markdown_table(headers, body)


def comparison_rows(runs: list[dict]) -> list[dict]:
    """Per (approach, model, data): the run best on validation, scored on test (validation if no test)."""
    best = {}
    for run in runs:
        metrics = run.get("metrics") or {}
        for stage, splits in metrics.items():
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
            stage = FINAL_STAGE.get(results.get("exercise"))
            stage = stage if stage in metrics else next(reversed(metrics), None)
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
    headers = [*axes, "status", "validation accuracy", "test accuracy", "macro F1", "time (s)"]
    body = []
    for row in rows:
        status = row["status"] if row["status"] == "ok" else f"failed: {fmt(row['error'])[:120]}"
        cells = [fmt(row["values"].get(axis)) for axis in axes]
        scores = [fmt(row["validation"]), fmt(row["test"]), fmt(row["f1_macro"]), fmt(row["seconds"], "seconds")]
        if row["name"] == best:
            scores[0] = f"**{scores[0]}**"
        body.append([*cells, status, *scores])
    return markdown_table(headers, body)


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot_ablation(sweep: dict, rows: list[dict], path: Path) -> Path | None:
    """Accuracy against the first swept key, one line per combination of the others."""
    from plots import plt

    axes = list(sweep["axes"])
    x_key, others = axes[0], axes[1:]
    splits = [split for split in ("validation", "test") if any(row[split] is not None for row in rows)]
    if not splits:
        return None
    x_values = sweep["axes"][x_key]
    numeric = all(_as_number(value) is not None for value in x_values)
    figure, panels = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for panel, split in zip(panels[0], splits):
        groups = {}
        for row in rows:
            label = ", ".join(f"{key}={row['values'].get(key)}" for key in others) or split
            groups.setdefault(label, []).append(row)
        for label, members in groups.items():
            points = [(row["values"][x_key], row[split]) for row in members if row[split] is not None]
            if numeric:
                points.sort(key=lambda point: _as_number(point[0]))
                xs = [_as_number(point[0]) for point in points]
            else:
                xs = [x_values.index(point[0]) for point in points]
            panel.plot(xs, [point[1] for point in points], "o-", label=label)
        if numeric:
            numbers = [_as_number(value) for value in x_values]
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
                panel.set_xscale("log")
        else:
            panel.set_xticks(range(len(x_values)), x_values, rotation=20)
        panel.set_xlabel(x_key)
        panel.set_ylabel(f"{split} accuracy")
        panel.grid(alpha=0.3)
        if len(groups) > 1:
            panel.legend(fontsize=8)
    figure.suptitle(f"sweep {sweep['name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_comparison(rows: list[dict], path: Path) -> Path | None:
    from plots import plt

    rows = [row for row in rows if row["accuracy"] is not None]
    if not rows:
        return None
    colors = {"exercise_1": "tab:blue", "exercise_2": "tab:orange", "exercise_3": "tab:green"}
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    labels = [f"{row['approach']} ({row['model']}, {row['data'].split('/')[-1]}, {row['split']})" for row in rows]
    axis.barh(range(len(rows)), [row["accuracy"] for row in rows],
              color=[colors.get(row["exercise"], "tab:gray") for row in rows])
    for index, row in enumerate(rows):
        axis.text(row["accuracy"], index, f" {row['accuracy']:.3f}", va="center", fontsize=8)
    axis.set_yticks(range(len(rows)), labels, fontsize=8)
    axis.set_xlim(0, 1.08)
    axis.set_xlabel("accuracy")
    axis.set_title("best run per approach (chosen on validation)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------
# Most confident mistakes, from each run's per-sample predictions files (evaluate.write_predictions)
# ---------------------------------------------------------------------------------------------

def confident_mistakes(run: dict, top: int = 3) -> list[dict]:
    """Up to `top` wrong predictions with the highest scores, from the predictions file of the run's
    stage best on validation, on test where it has one (none when the run wrote no such file)."""
    from evaluate import PREDICTIONS_DIR, read_predictions

    metrics = {stage: splits for stage, splits in (run.get("metrics") or {}).items() if splits}
    if not metrics:
        return []
    stage = max(metrics, key=lambda name: (metrics[name].get("validation") or {}).get("accuracy") or 0.0)
    split = headline_split(metrics[stage])
    path = Path(run["path"]).parent / PREDICTIONS_DIR / f"{stage}_{split}.csv"
    wrong = [row for row in read_predictions(path) if row["label"] != row["predicted"]] if path.is_file() else []
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
        rows = [row for run in runs if run.get("exercise", "?") == exercise for row in stage_rows(run)]
        sections += ["", f"## {exercise}", "", exercise_table(rows)]
    comparison = comparison_rows(runs)
    if comparison:
        sections += ["", "## Comparison across exercises", "",
                     "Best run per approach, model and data, chosen by validation accuracy and scored on test "
                     "(validation where there is no test split). `vs. baseline`: fine-tuned minus pretrained, "
                     "LoRA minus zero-shot, within the same run.", "", comparison_table(comparison)]
        image = plot_comparison(comparison, folder / "comparison.png")
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
        image = plot_ablation(sweep, rows, folder / f"ablation-{sweep['name']}.png")
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
        raise FileNotFoundError(f"runs folder {folder} does not exist")
    markdown, images = build_report(folder)
    path = folder / REPORT_FILE
    path.write_text(markdown)
    if tensorboard:
        log_to_tensorboard(folder, markdown)
    print(f"wrote {path}" + (f" and {', '.join(image.name for image in images)}" if images else ""))
    return path


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        write_report(argv[0], tensorboard="--no-tensorboard" not in argv)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
