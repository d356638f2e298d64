"""How each exercise's main stages grow with the data: seconds and peak memory at 2-3 sizes, and the
growth exponent between consecutive sizes, log(t2 / t1) / log(n2 / n1) (1: linear, 2: quadratic).

Goal: no stage grows worse than n^1.1 beyond 10,000 rows: each stage's exponent between its two largest sizes
is a ceiling of 1.1 (lower pairs, such as exercise 1's 5k -> 20k, are reported without a goal), except
libsvm's exact SVC, which exercise 1's svc_solver=auto chooses on purpose up to
exercise_1.SVC_EXACT_MAX_ROWS training texts: its exponents are reported, marked exempt, without a goal.

Every measurement runs in a fresh subprocess with glibc's mmap threshold fixed at 128 KB (large blocks go back
to the kernel when freed, so a stage cannot hide its memory in a heap an earlier one left) and resets the
kernel's peak-RSS mark right before its stage. Memory = peak RSS during the stage minus RSS just before it
(the stage's own growth; under 8 MB counts as 8 MB, allocator noise); its exponent as for time.

Time is the stage's CPU seconds (every thread of the process), and everything runs on one thread (torch
and BLAS; --threads) by default: on a machine other jobs load, a stage's wall time swings with their load
(several times over within minutes on shared cores) and so would the exponents; its CPU time does not. Wall seconds,
and their exponents, are in the JSON line too.

- exercise 1 on SST-2 phrases (train: all 60,614 in a seeded order, each size a prefix, so a smaller set lies
  inside a larger one; validation: its 6,735 texts). Extraction (exercise_1.extract_features, mean pooling)
  at the two smaller sizes only: it is one independent forward pass per batch of similar-length texts, and
  60k would cost minutes more. Then at every size: fit_classifier("svc") with the config defaults (the
  solver that ran is reported: exact up to 10,000 texts, Nystroem above), predict_scored on validation,
  fit_classifier("logreg"). Note fit_classifier also scores validation once (validation_accuracy_by_C),
  inside its time. Features of all train + validation texts come from exercise 1's own feature cache in
  --cache-dir; a first run extracts them once (the 20k timed extraction is reused; minutes more).
- exercise 2 at 6,000 and 60,000 training rows: exercise_2.tokenize, the Trainer's time to its first
  optimizer step (setup and the length-grouped sampler over every row), seconds per step after
  --warmup steps (exercise 2's batches, batch 16), peak memory of the training call.
- exercise 3: clip.evaluate_zero_shot on 1,000 and 10,000 Tiny ImageNet validation images (images opened
  lazily, a random tiny CLIP from tools/build_tiny_clip.py with the shared CLIP tokenizer).
- loading: data.load_text_dataset on a 10,000- and a 100,000-row CSV (SST-2 phrases repeated, string labels;
  validation and test carved, train subsampled to 5,000 with max_train_samples).
- a megabyte text: exercise_1.extract_features on 64 phrases plus one 1 MB text (max_length 128) against
  the 64 alone, and the tokenizer call alone.

    python -m bench.scaling                              # MiniLM, minutes on a CPU (a first run longer)
    python -m bench.scaling --threads 0                  # torch's and BLAS's own thread counts instead of one
    python -m bench.scaling --smoke --model <folder>     # seconds: tiny sizes, in this process
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

common.offline_env()
from bench.scaling_tasks import (MEMORY_FLOOR_MB, TASKS, exponent, ordered_text_data, run_task,  # noqa: E402
                                 size_label)

GOAL = 1.1              # the ceiling of every exponent with a goal


# ---------------------------------------------------------------------------------------------
# Exercise 1's features of every size, from the feature cache
# ---------------------------------------------------------------------------------------------

def all_features(args, train_texts, validation_texts, cache_dir: Path, saved: Path | None) -> tuple[np.ndarray, bool]:
    """(features of every training text, then every validation text; whether they came from the cache).
    On a miss the `saved` prefix (the timed extraction's features) is reused and only the rest extracted."""
    import cache
    import exercise_1

    texts = train_texts + validation_texts
    key = {"bench": "scaling", "model": cache.model_fingerprint(args.model), "texts": cache.texts_fingerprint(texts),
           "pooling": "mean", "max_length": args.max_length}

    def compute():
        prefix = np.load(saved) if saved and saved.exists() else np.empty((0, 0), np.float32)
        print(f"bench.scaling: extracting exercise 1's features of {len(texts) - len(prefix):,} texts once "
              f"(cached in {cache_dir})", file=sys.stderr)
        model, tokenizer = exercise_1.load_encoder(args.model)
        rest = exercise_1.extract_features(model, tokenizer, texts[len(prefix):], "mean", args.max_length,
                                           args.batch_size, "cpu", desc="features for the fits")
        return np.concatenate([prefix, rest]) if len(prefix) else rest

    return cache.cached_array(cache_dir, key, compute, name="scaling-features", rows=len(texts), dtype=np.float32)


def write_csv(folder: Path, rows: int, texts: list[str], labels: np.ndarray) -> Path:
    """A one-file dataset (train.csv, columns text and label, labels as strings) of `rows` rows, cycling the texts."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    picked = np.arange(rows) % len(texts)
    pd.DataFrame({"text": [texts[i] for i in picked],
                  "label": np.where(labels[picked] == 1, "positive", "negative")}).to_csv(folder / "train.csv",
                                                                                         index=False)
    return folder


# ---------------------------------------------------------------------------------------------
# Exponents, their goals and the printed table
# ---------------------------------------------------------------------------------------------

EXEMPT = "libsvm's exact SVC, chosen on purpose by svc_solver=auto up to exercise_1.SVC_EXACT_MAX_ROWS texts"


def stage_exponents(group: str, stage: str, points: list[tuple[int, dict]], exempt=lambda n1, n2: False) -> dict:
    """{key: (exponent, exempt, largest)} for time and memory between consecutive sizes of one stage; `points`
    are (size, {seconds, growth_mb}) in increasing size; `largest`: the pair of the two largest sizes."""
    found = {}
    pairs = list(zip(points, points[1:]))
    for number, ((n1, a), (n2, b)) in enumerate(pairs, 1):
        pair, flags = f"{size_label(n1)}_{size_label(n2)}", (exempt(n1, n2), number == len(pairs))
        found[f"{group}_{stage}_time_exp_{pair}"] = (exponent(n1, a["seconds"], n2, b["seconds"]), *flags)
        found[f"{group}_{stage}_memory_exp_{pair}"] = (
            exponent(n1, a["growth_mb"], n2, b["growth_mb"], MEMORY_FLOOR_MB), *flags)
    return found


def wall_exponents(group: str, stage: str, points: list[tuple[int, dict]]) -> dict:
    """The same time exponents on wall seconds (they follow the machine's load, so they carry no goal)."""
    return {f"{group}_{stage}_wall_exp_{size_label(n1)}_{size_label(n2)}": exponent(n1, a["wall_s"], n2, b["wall_s"])
            for (n1, a), (n2, b) in zip(points, points[1:])}


def print_stage(name: str, points: list[tuple[int, dict]], notes: dict | None = None) -> None:
    cells = [f"{size_label(n)}: {s['seconds']:.2f} cpu s ({s['wall_s']:.2f} wall), +{s['growth_mb']:.0f} MB"
             + (f" ({notes[n]})" if notes and n in notes else "") for n, s in points]
    pairs = list(zip(points, points[1:]))
    times = [exponent(n1, a["seconds"], n2, b["seconds"]) for (n1, a), (n2, b) in pairs]
    walls = [exponent(n1, a["wall_s"], n2, b["wall_s"]) for (n1, a), (n2, b) in pairs]
    memory = [exponent(n1, a["growth_mb"], n2, b["growth_mb"], MEMORY_FLOOR_MB) for (n1, a), (n2, b) in pairs]
    print(f"{name:<16} {' | '.join(cells)}  exponents: cpu {times}, wall {walls}, memory {memory}")


def parse_sizes(text: str, total: int | None = None) -> list[int]:
    return [total if part == "all" else int(part) for part in text.split(",")]


def main() -> None:
    parser = common.parser(__doc__, "sst2-phrases", "text encoder folder for exercises 1 and 2 (default: the packaged "
                                                    "all-MiniLM-L6-v2)")
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--images-dataset", default=None, help="Tiny ImageNet release folder (default: the shared one)")
    parser.add_argument("--sizes", default="5000,20000,all", help="exercise 1's training sizes ('all': every row)")
    parser.add_argument("--extract-sizes", default="5000,20000", help="exercise 1's sizes whose extraction is timed")
    parser.add_argument("--rows", default="6000,60000", help="exercise 2's training rows")
    parser.add_argument("--steps", type=int, default=12, help="exercise 2's optimizer steps per size")
    parser.add_argument("--warmup", type=int, default=2, help="exercise 2's first steps left out of seconds per step")
    parser.add_argument("--images", default="1000,10000", help="exercise 3's validation images")
    parser.add_argument("--csv-rows", default="10000,100000", help="rows of the CSV files loaded")
    parser.add_argument("--text-mb", type=float, default=1.0, help="size of the long text, in megabytes")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="exercise 1's eval_batch_size")
    parser.add_argument("--cache-dir", default=str(common.ROOT / "bench" / "results" / "cache"),
                        help="where exercise 1's features of every size are cached (a first run extracts them)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.set_defaults(threads=1)  # one thread unless --threads says otherwise (0: torch's and BLAS's defaults)
    args = common.parse_args(parser, "seconds: tiny sizes, in this process (the loading tasks still in children)",
                             common.minilm)
    if args.child:
        with contextlib.redirect_stdout(sys.stderr):
            task = json.loads(args.child)
            result = TASKS[task["kind"]](task)
        print(json.dumps(result))
        return
    from tools import assets

    images_dataset = args.images_dataset or str(assets.shared_dir() / "data" / "tiny-imagenet-200")
    smoke = args.smoke
    if smoke:
        args.sizes, args.extract_sizes, args.rows, args.images, args.csv_rows = "100,200,400", "100,200", "64,256", \
            "8,16", "1000,4000"
        args.steps, args.warmup, args.text_mb = 3, 1, 0.05
    validation_rows = 64 if smoke else None
    isolated = lambda kind: not smoke or kind == "loading"   # smoke keeps one child path tested
    run = lambda task: run_task(task, isolated(task["kind"]), args.threads)
    text = {"dataset": args.dataset, "text_column": args.text_column, "model": args.model}
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        # exercise 1: timed extraction at the smaller sizes; the largest one's features are kept for the fits
        train_texts, train_labels, validation_texts, validation_labels = ordered_text_data(
            args.dataset, args.text_column, validation_rows)
        sizes = parse_sizes(args.sizes, len(train_texts))
        extract_sizes = parse_sizes(args.extract_sizes, len(train_texts))
        saved = scratch / "extracted.npy"
        extraction = [run({"kind": "ex1_extract", **text, "n": n, "max_length": args.max_length,
                           "batch_size": args.batch_size, **({"save": str(saved)} if n == max(extract_sizes) else {})})
                      for n in extract_sizes]
        features, cached = all_features(args, train_texts, validation_texts, scratch if smoke else Path(args.cache_dir),
                                        saved)
        np.savez(scratch / "features.npz", train=features[:len(train_texts)], train_labels=train_labels,
                 validation=features[len(train_texts):], validation_labels=validation_labels)
        del features
        smoke_config = {"svc_exact_max_rows": 150, "config": {"svc_components": 32}} if smoke else {}
        classifiers = [run({"kind": "ex1_classifiers", "features": str(scratch / "features.npz"), "n": n, **smoke_config})
                       for n in sizes]
        # exercise 2, exercise 3, loading, the megabyte text
        ex2 = [run({"kind": "ex2_train", **text, "rows": n, "steps": args.steps, "warmup": args.warmup,
                    "batch_size": 4 if smoke else 16}) for n in parse_sizes(args.rows)]
        ex3 = [run({"kind": "ex3_zero_shot", "dataset": images_dataset, "n": n, "batch_size": 4 if smoke else 64})
               for n in parse_sizes(args.images)]
        loading = [run({"kind": "loading", "rows": n, "max_train_samples": 500 if smoke else 5000,
                        "folder": str(write_csv(scratch / f"csv-{n}", n, train_texts, train_labels))})
                   for n in parse_sizes(args.csv_rows)]
        megabyte = run({"kind": "megabyte", **text, "batch": 8 if smoke else 64, "text_mb": args.text_mb,
                        "max_length": args.max_length})

    exact = {r["n"] for r in classifiers if r["svc_solver"] == "exact"}
    svc_exempt = lambda n1, n2: n1 in exact or n2 in exact
    stages = {  # (group, stage) -> (points, exemption)
        ("ex1", "extract"): ([(r["n"], r["extract"]) for r in extraction], None),
        ("ex1", "svc_fit"): ([(r["n"], r["svc_fit"]) for r in classifiers], svc_exempt),
        ("ex1", "svc_predict"): ([(r["n"], r["svc_predict"]) for r in classifiers], svc_exempt),
        ("ex1", "logreg_fit"): ([(r["n"], r["logreg_fit"]) for r in classifiers], None),
        ("ex2", "tokenize"): ([(r["rows"], r["tokenize"]) for r in ex2], None),
        ("ex2", "train"): ([(r["rows"], r["train"]) for r in ex2], None),
        ("ex2", "first_step"): ([(r["rows"], {**r["first_step"], "growth_mb": 0}) for r in ex2], None),
        ("ex2", "step"): ([(r["rows"], {**r["step"], "growth_mb": 0}) for r in ex2], None),
        ("ex3", "zero_shot"): ([(r["n"], r["zero_shot"]) for r in ex3], None),
        ("load", "csv"): ([(r["rows"], r["load"]) for r in loading], None),
    }
    exponents, walls = {}, {}
    for (group, stage), (points, exempt) in stages.items():
        walls.update(wall_exponents(group, stage, points))
        found = stage_exponents(group, stage, points, exempt or (lambda n1, n2: False))
        if stage in ("first_step", "step"):  # their memory is the train call's
            found = {key: value for key, value in found.items() if "_memory_" not in key}
        exponents.update(found)
    solvers = {size_label(r["n"]): r["svc_solver"] for r in classifiers}
    notes = {r["n"]: r["svc_solver"] + (" solver, chosen on purpose" if r["svc_solver"] == "exact" else " solver")
             for r in classifiers}
    for (group, stage), (points, _) in stages.items():
        print_stage(f"{group} {stage}", points, notes if stage.startswith("svc") else None)
    big, normal = megabyte["with_big_text"], megabyte["normal"]
    print(f"{'megabyte text':<16} {megabyte['batch']} texts: {normal['seconds']:.2f} cpu s, +{normal['growth_mb']:.0f} MB"
          f" | with one {megabyte['text_chars'] / 2 ** 20:.2g} MB text: {big['seconds']:.2f} cpu s, "
          f"+{big['growth_mb']:.0f} MB (its tokenizer call alone: {megabyte['tokenize_big_text']['seconds']:.2f} cpu s, "
          f"+{megabyte['tokenize_big_text']['growth_mb']:.0f} MB)")
    if ex2:
        print(f"{'ex2 steps/s':<16} " + " | ".join(f"{size_label(r['rows'])} rows: {r['steps_per_cpu_s']} per cpu s "
                                             f"({r['steps_per_s']} per wall s)" for r in ex2))

    targets = {key: GOAL for key, (_, exempt, largest) in exponents.items() if largest and not exempt}
    megabyte_ratios = {"megabyte_text_time_ratio": round(big["seconds"] / normal["seconds"], 2),
                       "megabyte_text_memory_ratio": round(max(big["growth_mb"], MEMORY_FLOOR_MB)
                                                           / max(normal["growth_mb"], MEMORY_FLOOR_MB), 2)}
    steps_ratio = ({"ex2_steps_per_s_ratio": round(ex2[-1]["steps_per_cpu_s"] / ex2[0]["steps_per_cpu_s"], 3)}
                   if len(ex2) > 1 else {})
    common.emit({
        "bench": "scaling", "model": args.model, "dataset": args.dataset, "smoke": smoke,
        "exercise_1": {"sizes": [r["n"] for r in classifiers], "validation": classifiers[0]["validation"],
                       "svc_solvers": solvers, "svc_exact_max_rows": 150 if smoke else None,
                       "features_from_cache": cached, "extraction": extraction, "classifiers": classifiers},
        "exercise_2": ex2, "exercise_3": ex3, "loading": loading, "megabyte_text": megabyte,
        **{key: value for key, (value, _, _) in exponents.items()}, **megabyte_ratios, **steps_ratio,
        "exempt": {key: EXEMPT for key, (_, exempt, _) in exponents.items() if exempt},
        "without_goal": {key: "a lower pair of sizes: the goal is on each stage's two largest" for key, (_, exempt, largest)
                         in exponents.items() if not largest and not exempt},
        "wall_exponents": walls,
        "threads": args.threads or None,
        "seconds": round(time.perf_counter() - started, 1),
        "ratios": [*exponents, *steps_ratio, *megabyte_ratios], "targets": targets, "ceilings": list(targets),
        "met": all(exponents[key][0] <= goal for key, goal in targets.items()),
    }, args.results_file)


if __name__ == "__main__":
    main()
