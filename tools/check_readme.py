"""README check: the demo numbers the README quotes against a fresh run's results.json.

    python -m tools.check_readme exercise_1 runs/<a make demo run>
    python -m tools.check_readme exercise_3 runs/<a make demo-3 run>
    python -m tools.check_readme exercise_3 runs/<run> --readme other.md

The README quotes each demo's summary table as the script prints it (evaluate.results_table), in a fenced
block right after a marker line `<!-- demo: exercise_N -->`; it may quote only some of the columns. Every
quoted cell, (stage, split, metric) -> value as printed, must equal the run's metrics[stage][split][metric]
printed with as many decimals as the quote has. Prints one line per number that differs and ends with
`error: ...` and exit code 2; exit 0 with a one-line summary when all agree.
"""
from __future__ import annotations

import re
from pathlib import Path

import artifacts
import utils
from utils import LabError

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = re.compile(r"^<!--\s*demo:\s*(\S+)\s*-->\s*$")
KEYS = ("stage", "split")          # the first two columns of every table results_table prints


def quoted_tables(text: str, source: str = "README.md") -> dict[str, dict[tuple[str, str, str], str]]:
    """Every marked demo table in `text`: {exercise: {(stage, split, metric): value as quoted}}."""
    lines = text.splitlines()
    tables = {}
    for number, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        exercise = match.group(1)
        if exercise in tables:
            raise LabError(f"{source} line {number + 1}: a second table marked {exercise!r}; keep one")
        start = number + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        if start == len(lines) or not lines[start].strip().startswith("```"):
            raise LabError(f"{source} line {number + 1}: the marker {line.strip()!r} must be followed by a fenced "
                           f"(```) block holding the table")
        block = []
        for body in lines[start + 1:]:
            if body.strip().startswith("```"):
                break
            block.append(body)
        else:
            raise LabError(f"{source} line {start + 1}: the fenced block after {line.strip()!r} is never closed")
        tables[exercise] = parse_table(block, f"{source}, the table from line {start + 2}")
    return tables


def parse_table(lines: list[str], where: str = "the table") -> dict[tuple[str, str, str], str]:
    """The first table in `lines` (a header, a rule of dashes, rows up to the first blank line), as
    {(stage, split, metric): value}. What follows the table (`run folder: ...`) is not read."""
    rows = [line.split() for line in lines]
    while rows and not rows[0]:
        rows.pop(0)
    if not rows or tuple(rows[0][:2]) != KEYS or len(rows[0]) < 3:
        found = " ".join(rows[0]) if rows else "nothing"
        raise LabError(f"{where}: expected a header 'stage  split  <metric> ...', found {found!r}")
    header, body = rows[0], rows[1:]
    if body and set("".join(body[0])) == {"-"}:
        body = body[1:]
    cells = {}
    for offset, row in enumerate(body):
        if not row:
            break
        if len(row) != len(header):
            raise LabError(f"{where}, its row {offset + 1}: {len(row)} cells under {len(header)} columns: "
                           f"{' '.join(row)!r}")
        stage, split, *values = row
        for metric, value in zip(header[2:], values):
            if (stage, split, metric) in cells:
                raise LabError(f"{where}: {stage} {split} {metric} is quoted twice")
            cells[stage, split, metric] = value
    if not cells:
        raise LabError(f"{where}: the table has a header but no rows")
    return cells


def printed(value, like: str) -> str:
    """`value` as the quote `like` prints it: with as many decimals, '-' for a missing value (results_table's way)."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    decimals = len(like.partition(".")[2]) if "." in like else 0
    return f"{value:.{decimals}f}"


def compare(quoted: dict[tuple[str, str, str], str], metrics: dict) -> list[str]:
    """One line per quoted number the run's metrics do not reproduce, in the quote's order."""
    problems = []
    for (stage, split, metric), value in quoted.items():
        splits = metrics.get(stage)
        scores = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(scores, dict) or metric not in scores:
            missing = (f"stage {stage!r}" if not isinstance(splits, dict) else
                       f"split {split!r} in stage {stage!r}" if not isinstance(scores, dict) else f"{metric!r} there")
            problems.append(f"{stage} {split} {metric}: the README quotes {value}, the run has no {missing}")
            continue
        actual = printed(scores[metric], value)
        if actual != value:
            problems.append(f"{stage} {split} {metric}: the README quotes {value}, the run gives {actual}")
    return problems


def check(exercise: str, run_dir: Path, readme: Path = README) -> tuple[list[str], int]:
    """(mismatch lines, how many numbers were compared) between `readme`'s table for `exercise` and the run."""
    text = artifacts.check_file(readme, "give the README to check with --readme").read_text(encoding="utf-8")
    tables = quoted_tables(text, readme.name)
    if exercise not in tables:
        known = ", ".join(sorted(tables)) or "none"
        raise LabError(f"{readme} quotes no table marked <!-- demo: {exercise} --> (marked: {known})")
    results_file = run_dir if run_dir.name == "results.json" else run_dir / "results.json"
    results = artifacts.read_json(results_file, "give the folder of a finished run",
                                  keys={"exercise": str, "metrics": dict})
    if results["exercise"] != exercise:
        raise LabError(f"{results_file} is a run of {results['exercise']}, not {exercise}")
    return compare(tables[exercise], results["metrics"]), len(tables[exercise])


def main(argv: list[str]) -> int:
    readme = README
    if "--readme" in argv:
        at = argv.index("--readme")
        if at + 1 == len(argv):
            raise LabError("--readme needs a file")
        readme, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) != 2:
        raise LabError("usage: python -m tools.check_readme <exercise_N> <run folder> [--readme <file>]")
    exercise, run_dir = argv[0], Path(argv[1])
    problems, count = check(exercise, run_dir, readme)
    for line in problems:
        print(line)
    if problems:
        raise LabError(f"{len(problems)} of the {count} numbers {readme.name} quotes for {exercise} differ from "
                       f"{run_dir}: update the table after <!-- demo: {exercise} --> (or find what changed the run)")
    print(f"{readme.name}: all {count} numbers quoted for {exercise} match {run_dir}")
    return 0


if __name__ == "__main__":
    utils.run_cli(main)
