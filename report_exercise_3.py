"""The report's view of exercise 3: each run's stages side by side (zero-shot, each linear probe, the trained stage,
each interpolation scale), with the run's few-shot and interpolation plots."""
from __future__ import annotations

import os
from pathlib import Path

import tables


def stage_label(run: dict, stage: str) -> str:
    """What a stage of exercise 3 is, in words, from what the run recorded of it."""
    probes = run.get("linear_probe") or {}
    if stage == "zero_shot":
        count = len(run.get("prompts") or [])
        return f"zero-shot ({count} prompt{'s' * (count != 1)}, class names: {run['config'].get('class_names')})"
    if stage in probes:
        probe = probes[stage]
        return (f"linear probe on frozen {probe['features']} features, {probe['shots']} per class "
                f"({probe['train_images']} images, C={probe['C']:g})")
    of, _, scale = stage.partition("_scale_")
    if scale:
        return f"{of} update scaled by {scale} (WiSE-FT; 0 = zero-shot, 1 = trained)"
    return "LoRA adapters trained" if stage == "lora" else "every weight trained"


def section(runs: list[dict], folder: Path, fmt) -> list[str]:
    """Markdown lines: per run of exercise 3, a table of its stages in the order they ran and its plots (linked
    relative to the report's folder); `fmt` formats a cell as the report's other tables do."""
    lines = []
    for run in runs:
        metrics, timing = run.get("metrics") or {}, run.get("timing") or {}
        forgetting = any("forgetting" in splits for splits in metrics.values())
        rows = [[f"`{stage}`", stage_label(run, stage), fmt((splits.get("validation") or {}).get("accuracy")),
                 fmt((splits.get("validation") or {}).get("top5_accuracy")),
                 *([fmt((splits.get("forgetting") or {}).get("accuracy"))] if forgetting else []),
                 fmt(timing.get(stage, timing.get("evaluate") if stage in ("lora", "fine_tuned") else None), "seconds")]
                for stage, splits in metrics.items()]
        headers = ["stage", "what", "validation accuracy", "top-5", *(["forgetting set accuracy"] if forgetting else []),
                   "time (s)"]
        lines += ["", f"### `{run['run']}`: exercise 3's stages side by side", "", tables.markdown_table(headers, rows)]
        run_dir = Path(run["path"]).parent
        for name, title in (("few_shot.png", "few-shot probes vs zero-shot"), ("interpolation.png", "interpolation")):
            if (run_dir / name).is_file():
                lines += ["", f"![{title}]({os.path.relpath(run_dir / name, folder)})"]
    return lines
