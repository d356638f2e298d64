"""Peak memory of exercise 2's evaluation at N and 4N examples: does it grow with the eval set?

Exercise 2 evaluates through the Trainer with `preprocess_logits_for_metrics` (only the argmax id and
its probability are kept per example), so memory should stay flat as the evaluation set grows. Each size runs in a fresh
subprocess: build exercise 2's Trainer, warm it up on a few examples, reset the kernel's peak-RSS
mark (/proc/self/clear_refs), predict on the N examples, and read the peak (VmHWM). Growth = peak
during the evaluation minus RSS just before it. The JSON line gives both sizes and the ratios.

    python -m bench.eval_memory                          # real MiniLM, N = 1000 and 4000
    python -m bench.eval_memory --smoke --model <folder> # a few seconds, any small encoder
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
import data

common.offline_env()


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def measure(model_name: str, dataset: str, n: int) -> dict:
    """Runs in the child: exercise 2's Trainer predicting on n examples; memory before and at peak."""
    from transformers import TrainingArguments

    import evaluate
    import exercise_2
    import training
    import utils

    splits = data.load_text_dataset(dataset, seed=0, max_train_samples=n, max_eval_samples=16)
    utils.set_seed(0)  # the fresh classification head, as exercise 2 seeds it
    model, tokenizer = exercise_2.load_sequence_classifier(model_name, splits["train"].features["label"].names)
    tokenized = exercise_2.tokenize(splits, tokenizer, exercise_2.CONFIG["max_length"])
    config = utils.parse_config(exercise_2.CONFIG, ["tensorboard=false", "wandb_mode=disabled"])
    with tempfile.TemporaryDirectory() as scratch:
        trainer = training.LabTrainer(
            model=model, args=TrainingArguments(output_dir=scratch, per_device_eval_batch_size=config["eval_batch_size"],
                                                **training.shared_arguments(config, "cpu")),
            eval_dataset=tokenized["validation"], processing_class=tokenizer,
            data_collator=exercise_2.make_collator(tokenizer, "cpu"), compute_metrics=evaluate.compute_metrics,
            preprocess_logits_for_metrics=evaluate.preprocess_logits_for_metrics)
        trainer.predict(tokenized["validation"])  # warm-up: thread pools, allocator, lazy imports
        gc.collect()
        reset_peak_memory()
        before = memory_mb("VmRSS")
        start = time.perf_counter()
        output = trainer.predict(tokenized["train"])  # what exercise_2.evaluate_stage does per split
        seconds = time.perf_counter() - start
        peak = memory_mb("VmHWM")
    return {"n": n, "rss_before_mb": round(before, 1), "peak_mb": round(peak, 1), "growth_mb": round(peak - before, 1),
            "seconds": round(seconds, 2), "accuracy": output.metrics["test_accuracy"]}


# glibc raises its mmap threshold after large frees, so later tensors come from a heap that fragments
# with every new batch shape: RSS creeps up by chance. With the threshold fixed, big tensors go back
# to the kernel when freed and what is left is the evaluation's own memory.
ALLOCATORS = {"default": {}, "fixed_mmap_threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def run_child(model_name: str, dataset: str, n: int, threads: int | None, allocator_env: dict) -> dict:
    command = [sys.executable, "-m", "bench.eval_memory", "--child", str(n), "--model", model_name, "--dataset", dataset]
    done = subprocess.run(command + (["--threads", str(threads)] if threads else []), capture_output=True, text=True,
                          env={**os.environ, **allocator_env}, cwd=common.ROOT)
    if done.returncode != 0:
        raise SystemExit(f"evaluation of {n} examples failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = common.parser(__doc__, "rotten_tomatoes")
    parser.add_argument("--n", type=int, default=1000, help="the smaller evaluation set; the larger is 4n")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = common.parse_args(parser, "tiny run: n = 16", common.minilm)
    if args.child:
        print(json.dumps(measure(args.model, args.dataset, args.child)))
        return
    n = 16 if args.smoke else args.n
    sizes = {}
    for allocator, env in ALLOCATORS.items():
        small, large = (run_child(args.model, args.dataset, size, args.threads, env) for size in (n, 4 * n))
        sizes[allocator] = {"small": small, "large": large,
                            # under 1 MB of growth counts as 1 MB
                            "growth_ratio": round(large["growth_mb"] / max(small["growth_mb"], 1.0), 3),
                            "peak_ratio": round(large["peak_mb"] / small["peak_mb"], 3)}
    growth_ratio = sizes["default"]["growth_ratio"]
    common.emit({
        "bench": "eval_memory", "model": args.model, "n": n, "large_n": 4 * n,
        "growth_ratio": growth_ratio, "peak_ratio": sizes["default"]["peak_ratio"],
        "growth_ratio_fixed_mmap_threshold": sizes["fixed_mmap_threshold"]["growth_ratio"],
        "runs": sizes, "targets": {"growth_ratio": 1.2}, "met": growth_ratio <= 1.2,
    }, args.results_file)


if __name__ == "__main__":
    main()
