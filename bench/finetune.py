"""Exercise 2's training setup vs the same Trainer fed batches padded to max_length=256.

Both sides use exercise 2's own pieces: the seeded model from `load_sequence_classifier`, TrainingArguments
as exercise 2 sets them (`exercise_arguments`: batch 16, fp32 on CPU, fused AdamW), `training.LabTrainer`, for the same
fixed number of optimizer steps on the same batches: batches of exercise 2's first epoch on the full
training split, as its length-grouped sampler forms them, picked across the range of their widths (a
few steps on a small subset would group far worse than the exercise does: megabatches of 48 instead of
800 sentences, 23% padding instead of ~2%).
Ours tokenizes without padding and lets `DataCollatorWithPadding` pad each batch to its longest
text; the naive side pads every text to 256 tokens at tokenization time, as the course does.
Samples/s counts the steps after the first `--warmup`. Efficiency: useful FLOP/s (3 x the forward
matmul FLOPs on the real tokens each step saw: forward + backward) over an fp32 matmul FLOP/s
measured right before and after our run; the median of `--repeats` runs of our side counts.

    python -m bench.finetune                          # real MiniLM, 12 steps each
    python -m bench.finetune --smoke --model <folder> # a few seconds, any small encoder
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

from bench import common

common.offline_env()
import data  # noqa: E402
import exercise_2  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from transformers import DataCollatorWithPadding, TrainerCallback  # noqa: E402


class StepRecorder(TrainerCallback):
    """The wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def record_token_counts(model) -> list:
    """Attach a hook that appends (real token counts, padded width) of every training forward."""
    counts = []

    def hook(module, args, kwargs):
        if module.training and kwargs.get("attention_mask") is not None:
            mask = kwargs["attention_mask"]
            counts.append((mask.sum(dim=1).tolist(), mask.shape[1]))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


def exercise_arguments(config: dict, output_dir: Path, **changes):
    """TrainingArguments with the keys of exercise_2.main that decide what its training steps cost, from its
    `config`; `changes` adds a bench's own."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), max_steps=config["max_steps"],
                             per_device_train_batch_size=config["batch_size"],
                             per_device_eval_batch_size=config["eval_batch_size"], learning_rate=config["learning_rate"],
                             weight_decay=config["weight_decay"], warmup_steps=config["warmup"],
                             eval_strategy=config["eval_strategy"], eval_steps=config["eval_steps"],
                             **training.shared_arguments(config, "cpu"), **changes)


def exercise_batches(lengths: list[int], batch_size: int, count: int, seed: int) -> list[list[int]]:
    """`count` batches of exercise 2's first epoch, as its length-grouped sampler forms them (the stock
    LengthGroupedSampler seeded with `seed`, as `training.LabTrainer`'s is at epoch 0), picked at evenly spaced
    quantiles of their padded width so their lengths represent the whole epoch; in epoch order."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    by_width = sorted(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    picked = {by_width[int((k + 0.5) * len(batches) / count)] for k in range(min(count, len(batches)))}
    return [batches[b] for b in sorted(picked)]


def train_steps(model_name: str, splits, padding: str, warmup: int, timed: int, batch_size: int, run_dir: Path) -> dict:
    """Train `warmup + timed` optimizer steps the exercise-2 way: `timed` of exercise 2's own batches
    (see `exercise_batches`), after `warmup` repeats of the first of them; `padding`: "dynamic" or "max_length"."""
    label_names = splits["train"].features["label"].names
    utils.set_seed(0)
    model, tokenizer = exercise_2.load_sequence_classifier(model_name, label_names)
    config = utils.parse_config(exercise_2.CONFIG, [
        f"max_steps={warmup + timed}", f"batch_size={batch_size}", "eval_strategy=steps", "eval_steps=1000000",
        "logging_steps=1000000", "tensorboard=false", "wandb_mode=disabled"])
    dynamic = exercise_2.tokenize(splits, tokenizer, config["max_length"])
    batches = exercise_batches([len(ids) for ids in dynamic["train"]["input_ids"]], batch_size, timed, config["seed"])
    picked = [i for batch in batches[:warmup] + batches for i in batch]
    if padding == "dynamic":
        tokenized, collator = dynamic, exercise_2.make_collator(tokenizer, "cpu")
    else:  # the course: every text padded to 256 tokens up front
        tokenized = splits.map(lambda batch: tokenizer(batch["text"], padding="max_length", truncation=True,
                                                     max_length=256), batched=True, remove_columns=["text"])
        collator = DataCollatorWithPadding(tokenizer)
    # sequential: the picked batches are already in the exercise's order
    args = exercise_arguments(config, run_dir, train_sampling_strategy="sequential")
    recorder = StepRecorder()
    token_counts = record_token_counts(model)
    trainer = training.LabTrainer(
        model=model, args=args, train_dataset=tokenized["train"].select(picked),
        eval_dataset=tokenized["validation"], processing_class=tokenizer, data_collator=collator,
        callbacks=[recorder])
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log lines would mix with the JSON line
        trainer.train()
    return {"model": model, "step_ends": recorder.ends, "token_counts": token_counts}


def step_throughput(run: dict, warmup: int, batch_size: int) -> dict:
    """Samples/s and useful FLOP/s (forward + backward: 3x the forward's matmul FLOPs on the real tokens)
    of a `train_steps` run, over its steps after the first `warmup`."""
    steps = len(run["step_ends"])
    seconds = run["step_ends"][-1] - run["step_ends"][warmup - 1]
    timed = run["token_counts"][warmup:steps]
    lengths = [n for step, _ in timed for n in step]
    padded = sum(len(step) * width for step, width in timed)
    return {"samples_per_s": (steps - warmup) * batch_size / seconds,
            "flops_per_s": 3 * common.forward_flops(run["model"], lengths) / seconds,
            "real_tokens_per_sample": sum(lengths) / len(lengths), "real_share": sum(lengths) / padded}


def main() -> None:
    parser = common.parser(__doc__, "rotten_tomatoes")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=exercise_2.CONFIG["batch_size"])
    parser.add_argument("--max-train-samples", type=int, help="training sentences the batches come from (default: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of our side, each between two matmul yardsticks; the median counts (the "
                             "max_length side, far slower, runs once)")
    args = common.parse_args(parser, "tiny run: 3 steps of batch 4, one round, small matmul", common.minilm)
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.repeats = 3, 1, 4, 1
        args.max_train_samples = args.max_train_samples or 64
    matmul_size = 256 if args.smoke else 2048
    timed = args.steps - args.warmup

    splits = data.load_text_dataset(args.dataset, seed=0, max_train_samples=args.max_train_samples, max_eval_samples=8)
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.repeats):
            before = common.matmul_flops_per_s(matmul_size)  # the machine's speed drifts: measure around our run
            run = train_steps(args.model, splits, "dynamic", args.warmup, timed, args.batch_size,
                              Path(scratch) / f"dynamic-{round_number}")
            peak = max(before, common.matmul_flops_per_s(matmul_size))
            ours = step_throughput(run, args.warmup, args.batch_size)
            rounds.append({**ours, "efficiency": ours["flops_per_s"] / peak, "matmul_flops_per_s": peak})
        naive = step_throughput(train_steps(args.model, splits, "max_length", args.warmup, timed, args.batch_size,
                                            Path(scratch) / "max_length"), args.warmup, args.batch_size)

    samples_per_s = common.median(r["samples_per_s"] for r in rounds)
    speedup = samples_per_s / naive["samples_per_s"]
    efficiency = common.median(r["efficiency"] for r in rounds)
    common.emit({
        "bench": "finetune", "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
        "timed_steps": timed, "rounds": len(rounds),
        "real_tokens_per_sample": round(rounds[0]["real_tokens_per_sample"], 1),
        "real_token_share": round(rounds[0]["real_share"], 3),  # of the padded batches our side computed on
        "dynamic_samples_per_s": round(samples_per_s, 2),
        "max_length_samples_per_s": round(naive["samples_per_s"], 2),
        "speedup": round(speedup, 2),
        "model_gflop_per_s": round(common.median(r["flops_per_s"] for r in rounds) / 1e9, 2),
        "max_length_useful_gflop_per_s": round(naive["flops_per_s"] / 1e9, 2),
        "matmul_gflop_per_s": round(common.median(r["matmul_flops_per_s"] for r in rounds) / 1e9, 2),
        "efficiency": common.significant(efficiency),
        "per_round": [{"samples_per_s": round(r["samples_per_s"], 2), "efficiency": common.significant(r["efficiency"])}
                      for r in rounds],
        "efficiency_spread": [common.significant(min(r["efficiency"] for r in rounds)),
                              common.significant(max(r["efficiency"] for r in rounds))],
        "targets": {"speedup": 5.0, "efficiency": 0.55},
        "met": speedup >= 5.0 and efficiency >= 0.55,
    }, args.results_file)


if __name__ == "__main__":
    main()
