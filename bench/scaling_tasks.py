"""The stages bench.scaling times (exercise 1's extraction and classifiers, exercise 2's training steps,
exercise 3's zero-shot evaluation, loading a large CSV, a megabyte text), each a task run in a fresh child
process (`python -m bench.scaling --child <task>`), and how one stage is measured: CPU and wall seconds, and
the growth of peak memory (see bench/scaling.py)."""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

common.offline_env()
from bench.eval_memory import memory_mb, reset_peak_memory  # noqa: E402

MEMORY_FLOOR_MB = 8.0   # growth below this is allocator noise: counted as this much
TIME_FLOOR_S = 0.001    # and a stage quicker than this, timer noise


# ---------------------------------------------------------------------------------------------
# Measuring one stage
# ---------------------------------------------------------------------------------------------

def measure(function) -> tuple[object, dict]:
    """(result, {seconds (CPU, all threads), wall_s, rss_before_mb, peak_mb, growth_mb}) of one call; the peak is
    the process's highest RSS during the call (VmHWM after resetting it), growth that peak minus RSS just before."""
    gc.collect()
    reset_peak_memory()
    before = memory_mb("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    result = function()
    seconds, wall = time.process_time() - cpu_start, time.perf_counter() - start
    peak = memory_mb("VmHWM")
    return result, {"seconds": round(seconds, 4), "wall_s": round(wall, 4), "rss_before_mb": round(before, 1),
                    "peak_mb": round(peak, 1), "growth_mb": round(peak - before, 1)}


def step_clock():
    """A TrainerCallback recording wall and CPU time at the end of every optimizer step (transformers is imported
    here: the children that do not train start faster without it)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return StepClock()


def exponent(n1: float, v1: float, n2: float, v2: float, floor: float = TIME_FLOOR_S) -> float:
    """The growth exponent of a value (seconds; memory with floor=MEMORY_FLOOR_MB) from size n1 to n2."""
    return round(math.log(max(v2, floor) / max(v1, floor)) / math.log(n2 / n1), 3)


def size_label(n: int) -> str:
    return str(n) if n < 1000 else f"{n / 1000:.3g}k"


def ordered_text_data(dataset: str, text_column: str, validation_rows: int | None):
    """(train texts, train labels, validation texts, validation labels): every training row of `dataset` in a
    seeded order (each size is a prefix of it), and its validation split (its first `validation_rows`)."""
    texts, labels, validation_texts, validation_labels = _ordered_text_data(dataset, text_column)
    rows = validation_rows or len(validation_texts)
    return list(texts), labels.copy(), list(validation_texts[:rows]), validation_labels[:rows].copy()


@functools.lru_cache(maxsize=2)  # --smoke runs every task in this one process: the data is read once
def _ordered_text_data(dataset: str, text_column: str):
    import data

    splits = data.load_text_dataset(dataset, text_column, seed=0)
    order = np.random.default_rng(0).permutation(len(splits["train"]))
    texts, labels = list(splits["train"]["text"]), np.asarray(splits["train"]["label"])
    return [texts[i] for i in order], labels[order], list(splits["validation"]["text"]), np.asarray(splits["validation"]["label"])


# ---------------------------------------------------------------------------------------------
# The tasks: each runs in a child process (or in this one with --smoke) and returns a JSON-able dict
# ---------------------------------------------------------------------------------------------

def task_ex1_extract(task: dict) -> dict:
    """Exercise 1's extraction of the first n training texts (mean pooling); saves them when asked."""
    import exercise_1

    texts = ordered_text_data(task["dataset"], task["text_column"], 1)[0][:task["n"]]
    model, tokenizer = exercise_1.load_encoder(task["model"])
    extract = lambda rows: exercise_1.extract_features(model, tokenizer, rows, "mean", task["max_length"],
                                                       task["batch_size"], "cpu", desc=f"extract {len(rows)}")
    extract(texts[:64])  # warm-up: thread pool, first allocations
    features, stats = measure(lambda: extract(texts))
    if task.get("save"):
        np.save(task["save"], features)
    return {"n": len(texts), "extract": stats}


def task_ex1_classifiers(task: dict) -> dict:
    """Exercise 1's SVC (config defaults: svc_solver=auto) and logistic regression on the first n training
    features: fit_classifier, then predict_scored on the validation features."""
    import exercise_1

    if task.get("svc_exact_max_rows"):  # --smoke: a tiny threshold, so the approximate solver runs too
        exercise_1.SVC_EXACT_MAX_ROWS = task["svc_exact_max_rows"]
    config = {**exercise_1.CONFIG, **task.get("config", {})}
    stored = np.load(task["features"])
    n = task["n"]
    features = {"train": np.ascontiguousarray(stored["train"][:n]), "validation": stored["validation"]}
    labels = {"train": stored["train_labels"][:n], "validation": stored["validation_labels"]}
    result = {"n": n, "validation": len(labels["validation"])}
    for kind in ("svc", "logreg"):
        (classifier, chosen), result[f"{kind}_fit"] = measure(lambda: exercise_1.fit_classifier(kind, config, features,
                                                                                                labels))
        (predicted, _), result[f"{kind}_predict"] = measure(lambda: exercise_1.predict_scored(classifier,
                                                                                              features["validation"]))
        result[f"{kind}_solver"] = chosen["solver"]
        result[f"{kind}_validation_accuracy"] = round(float((predicted == labels["validation"]).mean()), 4)
    return result


def task_ex2_train(task: dict) -> dict:
    """Exercise 2 on `rows` training rows: tokenize, then `steps` optimizer steps of its Trainer (its arguments,
    length-grouped batches); the time to the first step, seconds per step after `warmup`, memory."""
    import data
    import exercise_2
    import training
    import utils
    from bench import finetune

    config = utils.parse_config(exercise_2.CONFIG, [
        f"max_steps={task['steps']}", f"batch_size={task['batch_size']}", "eval_strategy=steps",
        "eval_steps=1000000", "logging_steps=1000000", "tensorboard=false", "wandb_mode=disabled"])
    splits = data.load_text_dataset(task["dataset"], task["text_column"], seed=config["seed"],
                                    max_train_samples=task["rows"], max_eval_samples=16)
    utils.set_seed(config["seed"])
    model, tokenizer = exercise_2.load_sequence_classifier(task["model"], splits["train"].features["label"].names)
    tokenized, tokenize_stats = measure(lambda: exercise_2.tokenize(splits, tokenizer, config["max_length"],
                                                                    model.config))
    clock, counts = step_clock(), finetune.record_token_counts(model)
    with tempfile.TemporaryDirectory() as scratch:
        args = finetune.exercise_arguments(config, Path(scratch), train_sampling_strategy="group_by_length")
        trainer = training.LabTrainer(model=model, args=args, train_dataset=tokenized["train"],
                                      eval_dataset=tokenized["validation"], processing_class=tokenizer,
                                      data_collator=exercise_2.make_collator(tokenizer, "cpu"), callbacks=[clock])
        start, cpu_start = time.perf_counter(), time.process_time()
        _, train_stats = measure(trainer.train)
    warmup, steps = task["warmup"], len(clock.cpu)
    step = {"seconds": (clock.cpu[-1] - clock.cpu[warmup - 1]) / (steps - warmup),
            "wall_s": (clock.wall[-1] - clock.wall[warmup - 1]) / (steps - warmup)}
    padded = sum(len(lengths) * width for lengths, width in counts[warmup:steps])
    return {"rows": len(tokenized["train"]), "steps": steps, "timed_steps": steps - warmup,
            "tokenize": tokenize_stats, "train": train_stats,
            "first_step": {"seconds": round(clock.cpu[0] - cpu_start, 3), "wall_s": round(clock.wall[0] - start, 3)},
            "step": {key: round(value, 4) for key, value in step.items()},
            "steps_per_cpu_s": round(1 / step["seconds"], 2), "steps_per_s": round(1 / step["wall_s"], 2),
            "padded_tokens_per_step": round(padded / (steps - warmup), 1)}


def task_ex3_zero_shot(task: dict) -> dict:
    """Exercise 3's zero-shot evaluation (clip.evaluate_zero_shot) of n validation images, opened lazily."""
    import clip
    from bench import zeroshot

    model, tokenizer, image_processor, description = zeroshot.load_bench_clip(None, "tiny")
    validation = zeroshot.validation_images(task["dataset"], task["n"])
    class_names = validation.features["label"].names
    collator = clip.ImageTextCollator(tokenizer, class_names)
    lazy = validation.with_transform(clip.ImageTransform(image_processor))
    classifier = clip.build_zero_shot_classifier(model, tokenizer, class_names)
    evaluate = lambda dataset: clip.evaluate_zero_shot(model, classifier, class_names, dataset, collator,
                                                       batch_size=task["batch_size"], desc=f"zero-shot {len(dataset)}")
    evaluate([lazy[i] for i in range(min(task["batch_size"], len(lazy)))])  # warm-up on one batch
    result, stats = measure(lambda: evaluate(lazy))
    return {"n": len(lazy), "model": description, "zero_shot": stats,
            "images_per_s": round(len(result.labels) / stats["seconds"], 1), "accuracy": result.metrics["accuracy"]}


def task_loading(task: dict) -> dict:
    """data.load_text_dataset on a one-file CSV dataset: read, validate, carve validation and test, subsample."""
    import importlib

    import data

    for module in ("datasets", "pandas", "sklearn.model_selection"):  # imported before the timing, as in a run
        importlib.import_module(module)

    splits, stats = measure(lambda: data.load_text_dataset(task["folder"], seed=0,
                                                           max_train_samples=task["max_train_samples"]))
    return {"rows": task["rows"], "file_mb": round(Path(task["folder"], "train.csv").stat().st_size / 2 ** 20, 2),
            "splits": {split: len(rows) for split, rows in splits.items()}, "load": stats}


def task_megabyte(task: dict) -> dict:
    """Exercise 1's extraction of a normal batch, then of the same batch plus one text of `text_mb` megabytes,
    and the tokenizer call alone on each."""
    import exercise_1

    pool, _, texts, _ = ordered_text_data(task["dataset"], task["text_column"], task["batch"])
    size = int(task["text_mb"] * 2 ** 20)
    parts, length, i = [], 0, 0
    while length < size:
        parts.append(pool[i % len(pool)].strip())
        length, i = length + len(parts[-1]) + 1, i + 1
    big = " ".join(parts)[:size]
    model, tokenizer = exercise_1.load_encoder(task["model"])
    max_length = task["max_length"]
    extract = lambda rows: exercise_1.extract_features(model, tokenizer, rows, "mean", max_length, 64, "cpu",
                                                       desc=f"extract {len(rows)}")
    tokenize = lambda rows: tokenizer(rows, truncation=True, max_length=max_length)["input_ids"]
    extract(texts)  # warm-up
    normal, normal_stats = measure(lambda: extract(texts))
    _, normal_tokenize = measure(lambda: tokenize(texts))
    with_big, big_stats = measure(lambda: extract(texts + [big]))
    big_ids, big_tokenize = measure(lambda: tokenize([big]))
    return {"batch": len(texts), "text_chars": len(big), "text_tokens_kept": len(big_ids[0]),
            "normal": normal_stats, "with_big_text": big_stats, "tokenize_normal": normal_tokenize,
            "tokenize_big_text": big_tokenize, "normal_features_unchanged": bool(np.allclose(normal, with_big[:-1],
                                                                                             atol=1e-5))}


TASKS = {"ex1_extract": task_ex1_extract, "ex1_classifiers": task_ex1_classifiers, "ex2_train": task_ex2_train,
         "ex3_zero_shot": task_ex3_zero_shot, "loading": task_loading, "megabyte": task_megabyte}


ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # bench.eval_memory's fixed_mmap_threshold


def thread_env(threads: int | None) -> dict:
    """BLAS and OpenMP thread counts for a child (torch's is set by --threads): numpy's and sklearn's too."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")} if threads else {}


def run_task(task: dict, isolated: bool, threads: int | None) -> dict:
    """One task in a fresh `python -m bench.scaling --child` process (its stderr passes through), or here."""
    start = time.perf_counter()
    if not isolated:
        with contextlib.redirect_stdout(sys.stderr):
            return {**TASKS[task["kind"]](task), "task_wall_s": round(time.perf_counter() - start, 1)}
    command = [sys.executable, "-m", "bench.scaling", "--child", json.dumps(task), "--model", task.get("model", "-")]
    env = {**os.environ, **ALLOCATOR_ENV, **thread_env(threads)}
    done = subprocess.run(command + (["--threads", str(threads)] if threads else []), stdout=subprocess.PIPE,
                          text=True, cwd=common.ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench.scaling task {task['kind']} failed (exit {done.returncode}); its error is above")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "task_wall_s": round(time.perf_counter() - start, 1)}
