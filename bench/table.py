"""One table of every bench's ratios, their goals and whether they are met (what `make bench` prints last).

Reads the JSON lines the benches append to bench/results/*.jsonl and keeps the newest line of each
(bench, model) pair, so the tiny CLIP's and the ViT-B/16 shape's runs of a bench get rows of their own.
A line's ratios are the keys its "ratios" field names, else the keys of its "targets"; a ratio without
a goal is printed with "-". A goal is a floor unless its key is in AT_MOST or in the line's "ceilings"
(bench.scaling's growth exponents). The table is Markdown, ready for the README.

    python -m bench.table                        # bench/results/
    python -m bench.table --results-dir <folder>
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import tables
from bench.common import ROOT

# goals that are ceilings (memory growth, accuracy lost to int8); every other goal is a floor
AT_MOST = {"growth_ratio", "accuracy_drop_points"}


def newest_results(results_dir: Path) -> list[dict]:
    """The last line of each (bench, model) pair, in file order: benches append, so the last is the newest."""
    newest = {}
    for path in sorted(results_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                newest[(result["bench"], str(result.get("model")))] = result
    return list(newest.values())


def model_label(model) -> str:
    """A model folder by its last two names (the full path is long; packaged models end in .../model); a
    description as it is."""
    return "/".join(Path(model).parts[-2:]) if model and Path(model).exists() else str(model)


def rows(result: dict) -> list[tuple[str, float, str, str]]:
    """(measure, ratio, goal, met) for each ratio of one result; goal and met are "-" without a goal."""
    targets = result.get("targets", {})
    ceilings = AT_MOST | set(result.get("ceilings", ()))
    measured = []
    for key in result.get("ratios") or targets:
        measure, ratio, goal = f"{result['bench']} ({model_label(result.get('model'))}): {key}", result[key], targets.get(key)
        if goal is None:
            measured.append((measure, ratio, "-", "-"))
        else:
            met = ratio <= goal if key in ceilings else ratio >= goal
            measured.append((measure, ratio, f"{'<=' if key in ceilings else '>='} {goal:g}", "yes" if met else "no"))
    return measured


def table(results: list[dict]) -> str:
    return tables.markdown_table(["measure", "ratio", "goal", "met", "run at"],
                                 [[measure, f"{ratio:g}", goal, met, str(result.get("time", "?"))]
                                  for result in results for measure, ratio, goal, met in rows(result)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    results = newest_results(Path(parser.parse_args().results_dir))
    print(table(results) if results else "no bench results yet: run `make bench`")


if __name__ == "__main__":
    main()
