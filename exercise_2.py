"""Exercise 2: what does fine-tuning the whole transformer buy over frozen features?

Exercise 1 froze the encoder; here every weight learns (or, with `lora.enabled=True`, only small
LoRA adapters and the classification head). The Hugging Face Trainer does the training; the model
is scored before training (`pretrained`: the encoder with its fresh, random head) and after
(`fine_tuned`: the checkpoint best on validation), each on validation and test.

    python exercise_2.py                                          # Hub defaults (needs the Hub)
    python exercise_2.py model_name=<folder> dataset=<folder>     # offline
    python exercise_2.py ... run_name=rt resume=True              # continue rt from its newest checkpoint
    python exercise_2.py ... lora.enabled=True lora.r=8           # LoRA on query and value
    torchrun --nproc_per_node=2 exercise_2.py ...                 # data parallel (DDP), one results.json
    python exercise_2.py --help                                   # every key with its default

Ctrl-C or SIGTERM during training saves a checkpoint and exits; `resume=True` then continues to
the same result an uninterrupted run reaches. A NaN or infinite loss stops training and keeps the
checkpoints saved before it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

import LoRA
import data
import evaluate
import faults
import hub
import plots
import training
import utils

CONFIG = {
    # what to run on: a Hub id or a local folder for each
    "model_name": "distilbert-base-uncased",  # Hub id or local folder of the pretrained model
    "dataset": "cornell-movie-review-data/rotten_tomatoes",  # Hub id or local folder (see the README's Data section)
    "text_column": "text",           # column holding the text in table files
    "label_column": "label",         # column holding the label (ints or strings) in table files
    "max_train_samples": None,       # None = all; subsamples are stratified and seeded
    "max_eval_samples": None,        # None = all; validation and test subsamples, stratified and seeded
    "max_length": 128,               # tokens; longer texts are truncated, each batch padded to its longest
    # optimisation; batch sizes are per process: the global batch is
    # batch_size x processes x gradient_accumulation_steps
    "learning_rate": 5e-5,           # AdamW peak learning rate for full fine-tuning
    "num_train_epochs": 3.0,         # passes over the training split
    "max_steps": None,               # None = num_train_epochs decides; else this many optimizer steps
    "batch_size": 16,                # training examples per step and process (global: x processes x accumulation)
    "eval_batch_size": 64,           # examples per forward pass when evaluating
    "gradient_accumulation_steps": 1,  # steps whose gradients are summed before one optimizer update
    "weight_decay": 0.01,            # AdamW weight decay
    "warmup": 0.1,                   # < 1: fraction of all steps; >= 1: number of steps
    "lr_scheduler_type": "linear",   # learning-rate schedule after warmup
    "max_grad_norm": 1.0,            # gradients are clipped to this global norm
    "group_by_length": True,         # batches of similar length: less padding; order still random per epoch
    "mixed_precision": "auto",       # auto: bf16 (or fp16) on CUDA, fp32 on CPU
    # evaluation and checkpoints
    "eval_strategy": "epoch",        # "epoch" | "steps" (every eval_steps); a checkpoint at every evaluation
    "eval_steps": 200,               # with eval_strategy=steps: evaluate every this many steps
    "logging_steps": 50,             # log the training loss every this many steps
    "metric_for_best_model": "accuracy",  # validation metric that picks the checkpoint to test
    "save_total_limit": 2,           # checkpoints kept; the best one always is
    "evaluate_pretrained": True,     # score the untrained model as the `pretrained` stage
    "resume": False,                 # continue run_name from its newest checkpoint
    "resume_changes": False,         # resume even with settings that change training (the run's are in run_config.json)
    # LoRA: train low-rank adapters on the attention projections plus the classification head
    "lora": {
        "enabled": False,            # train LoRA adapters (True) or every weight (False)
        "r": 8,                      # rank of each adapter
        "alpha": 16,                 # adapter scale alpha/r
        "dropout": 0.1,              # dropout on the adapter input, in [0, 1)
        "target_modules": ["query", "value"],  # roles query/key/value/output, or the model's module names
        "use_rslora": False,         # rank-stabilised scale alpha/sqrt(r) instead of alpha/r
        "modules_to_save": [],       # whole modules trained too (the classification head always is)
        "learning_rate": 5e-4,       # replaces learning_rate: adapters start at zero and need larger steps
    },
    # run bookkeeping and logging (report_to follows tensorboard and wandb_mode)
    "output_dir": "runs",            # where run folders go
    "run_name": None,                # None = exercise_2-<time>; needed with resume=True
    "overwrite": False,              # replace an existing run folder of the same name
    "seed": 42,                      # seeds Python, NumPy, torch, splits and subsampling
    "wandb_mode": "offline",         # "offline" | "online" | "disabled"
    "wandb_project": "transformer-labs",  # W&B project the run is logged to
    "tensorboard": True,             # TensorBoard event files in <run>/tensorboard
    "trust_remote_code": False,      # run code shipped with a Hub model; only for models you trust
}
METRICS = ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro",
           "precision_weighted", "recall_weighted", "f1_weighted")
CHOICES = {**training.CHOICES, "eval_strategy": ("epoch", "steps"), "metric_for_best_model": METRICS}
POSITIVE = (*training.POSITIVE, "max_length")
NON_NEGATIVE, FRACTIONS, INTEGERS = training.NON_NEGATIVE, training.FRACTIONS, training.INTEGERS


def main(argv: list[str] | None = None, callbacks=()):
    """Run exercise 2; `callbacks`: extra TrainerCallbacks (e.g. EarlyStoppingCallback)."""
    from accelerate import PartialState
    from transformers import TrainingArguments

    # 1. config; torchrun has already started the processes, PartialState joins them up
    config = utils.parse_config(CONFIG, argv or [], CHOICES, POSITIVE, __file__, non_negative=NON_NEGATIVE,
                                fractions=FRACTIONS, integers=INTEGERS)
    device = utils.best_device()
    training.check_config(config, device)
    distributed = PartialState(cpu=device == "cpu")
    main_process = distributed.is_main_process
    timing = {}
    start = time.perf_counter()

    # 2. data: train / validation / test with text and integer labels
    with utils.timed(timing, "load_data"):
        splits = data.load_text_dataset(config["dataset"], config["text_column"], config["label_column"],
                                        config["seed"], config["max_train_samples"], config["max_eval_samples"])
    label_names = splits["train"].features["label"].names
    if main_process:
        print(f"data: {', '.join(f'{s} {len(d)}' for s, d in splits.items())}; classes {label_names}")

    # 3. the model: pretrained encoder + fresh head (seeded), optionally wrapped with LoRA adapters
    with utils.timed(timing, "load_model"):
        utils.set_seed(config["seed"])
        model, tokenizer = load_sequence_classifier(config["model_name"], label_names, config["trust_remote_code"])
        if config["lora"]["enabled"]:
            model = LoRA.apply_lora(model, config["lora"])
    trainable, total = LoRA.count_parameters(model)
    if main_process:
        print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    # 4. token ids without padding; the collator pads each batch to its own longest text
    with utils.timed(timing, "tokenize"):
        tokenized = tokenize(splits, tokenizer, config["max_length"], model.config)

    # 5. the run folder (one for all processes) and loggers, once data and model are in hand
    run_dir, loggers = training.start_trainer_run(config, distributed, "exercise_2")

    # 6. TrainingArguments: how the model is optimised, then when it is evaluated and saved: together, so the
    #    checkpoint best on validation can be the one tested. The keys exercise 3 sets alike (reporters,
    #    precision, pinned memory, logging) come from training.shared_arguments
    every = config["eval_steps"] if config["eval_strategy"] == "steps" else None
    args = TrainingArguments(
        output_dir=str(run_dir), run_name=run_dir.name, seed=config["seed"],
        learning_rate=training.learning_rate(config),  # lora.learning_rate with LoRA
        num_train_epochs=config["num_train_epochs"], max_steps=config["max_steps"] or -1,  # -1: the epochs decide
        per_device_train_batch_size=config["batch_size"], per_device_eval_batch_size=config["eval_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"], weight_decay=config["weight_decay"],
        warmup_steps=config["warmup"], lr_scheduler_type=config["lr_scheduler_type"],
        max_grad_norm=config["max_grad_norm"],
        train_sampling_strategy="group_by_length" if config["group_by_length"] else "random",
        eval_strategy=config["eval_strategy"], eval_steps=every,
        save_strategy=config["eval_strategy"], save_steps=every, save_total_limit=config["save_total_limit"],
        load_best_model_at_end=True, metric_for_best_model=config["metric_for_best_model"],
        **training.shared_arguments(config, device))

    # 7. the Trainer: the collator pads each batch, compute_metrics scores the argmax ids (evaluate.py)
    stop = training.StopOnSignal()
    trainer = training.LabTrainer(
        model=model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
        processing_class=tokenizer, data_collator=make_collator(tokenizer, device),
        compute_metrics=evaluate.compute_metrics, preprocess_logits_for_metrics=evaluate.preprocess_logits_for_metrics,
        callbacks=[stop.callback(), *callbacks])

    # 8. the `pretrained` stage: the same model before any training
    metrics, outputs, speed = {}, {}, {}
    # what a run stopped by a signal or a failed write keeps: its checkpoints, and the command that continues
    kept = lambda: f"no results written; {training.resume_hint(run_dir, config, run_dir.name)}"
    if config["evaluate_pretrained"]:
        with utils.timed(timing, "pretrained"), faults.stage("the pretrained evaluation", kept):
            metrics["pretrained"], outputs["pretrained"], speed["pretrained"] = evaluate_stage(trainer, tokenized)

    # 9. train, from the newest checkpoint when resuming
    checkpoint = training.resume_checkpoint(config, run_dir, main_process)
    with utils.timed(timing, "train"), training.guarded(trainer, stop, run_dir, config, loggers):
        train_output = trainer.train(resume_from_checkpoint=checkpoint)

    # 10. the `fine_tuned` stage: the best checkpoint (loaded by the Trainer) on validation and test
    with utils.timed(timing, "evaluate"), faults.stage("the fine_tuned evaluation", kept):
        metrics["fine_tuned"], outputs["fine_tuned"], speed["fine_tuned"] = evaluate_stage(trainer, tokenized)
    timing["total"] = round(time.perf_counter() - start, 3)
    if not main_process:
        return run_dir

    # 11. results file, plots and summary (main process only)
    with faults.stage("writing the results", kept):
        matrices, reports = {}, {}
        for stage, predictions in outputs.items():
            matrices[stage] = {split: evaluate.confusion(labels, predicted, len(label_names)).tolist()
                               for split, (labels, predicted, _) in predictions.items()}
            reports[stage] = evaluate.classification_report_text(*predictions["test"][:2], label_names)
            for split, (labels, predicted, scores) in predictions.items():
                evaluate.write_predictions(run_dir, stage, split, range(len(labels)), splits[split]["text"], labels,
                                           predicted, scores, label_names)
        curves = plots.plot_training_curves(trainer.state.log_history, run_dir / "training_curves.png")
        confusion = plots.plot_confusion_matrix(np.asarray(matrices["fine_tuned"]["test"]), label_names,
                                                run_dir / "confusion_fine_tuned_test.png", "fine-tuned on test")
        # step=None: W&B appends these after the Trainer's own steps instead of dropping them as out of order
        for stage in metrics:
            loggers.log_metrics(metrics[stage], prefix=f"{stage}.", step=None)
        loggers.log_figure("fine_tuned/training_curves", curves, step=None)
        loggers.log_figure("fine_tuned/confusion_test", confusion, step=None)
        loggers.log_text("fine_tuned/classification_report_test", reports["fine_tuned"])
        if config["lora"]["enabled"]:
            LoRA.save_adapter(trainer.model, run_dir / "adapter")
        best = trainer.state.best_model_checkpoint
        model_info = {"name": config["model_name"], "parameters": total, "trainable_parameters": trainable,
                      "num_labels": len(label_names), "lora": config["lora"] if config["lora"]["enabled"] else None,
                      "adapter": str(run_dir / "adapter") if config["lora"]["enabled"] else None}
        train_metrics = train_output.metrics
        evaluate.write_results(
            run_dir, "exercise_2", config, metrics, timing, model_info, label_names=label_names, report_to=args.report_to,
            best_checkpoint=best, best_metric={config["metric_for_best_model"]: trainer.state.best_metric},
            training={"global_step": trainer.state.global_step, "epochs": trainer.state.epoch,
                      "train_loss": train_metrics.get("train_loss"), "resumed_from": checkpoint,
                      "processes": distributed.num_processes, "device": device},
            throughput={"train_samples_per_second": train_metrics.get("train_samples_per_second"),
                        "eval_samples_per_second": speed},
            confusion_matrices=matrices, classification_reports=reports,
            data_sizes={split: len(dataset) for split, dataset in splits.items()}, memory=peak_memory(device),
            log_history=trainer.state.log_history)
    loggers.finish()
    print(f"\n{evaluate.results_table(metrics)}\n\nbest checkpoint: {best}\n"
          f"train: {train_metrics.get('train_samples_per_second')} samples/s over {timing['train']:.0f} s\n"
          f"run folder: {run_dir}")
    return run_dir



# ---------------------------------------------------------------------------------------------
# The pieces main() assembles
# ---------------------------------------------------------------------------------------------

def tokenize(splits, tokenizer, max_length: int, model_config=None):
    """Token ids per text, truncated but not padded: the collator pads each batch to its longest. Texts are
    cut at `max_length` tokens, or at the model's own limit (its tokenizer's, `model_config`'s) when lower."""
    max_length = hub.usable_max_length(max_length, tokenizer, model_config)
    return splits.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
                      batched=True, remove_columns=["text"], desc="tokenize")


def make_collator(tokenizer, device: str):
    from transformers import DataCollatorWithPadding

    # widths that are multiples of 8 let CUDA tensor cores work; on CPU they are only extra padding
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device == "cuda" else None)


def load_sequence_classifier(model_name: str, label_names: list[str], trust_remote_code: bool = False):
    """A pretrained encoder with a fresh classification head for `label_names`, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    source, tokenizer = hub.text_source_and_tokenizer(model_name, "exercise 2", trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)}, ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code, use_safetensors=None)
    except ValueError as error:
        raise utils.LabError(f"{model_name} cannot be loaded for sequence classification: {error}") from None
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with the end-of-text token
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def evaluate_stage(trainer, datasets) -> tuple[dict, dict, dict]:
    """Metrics, (labels, predicted ids, winning probabilities) and samples/s per split; only those two
    numbers per example are kept (evaluate.preprocess_logits_for_metrics), not every class's logit."""
    metrics, outputs, speed = {}, {}, {}
    for split in ("validation", "test"):
        with in_row_order(trainer):
            output = trainer.predict(datasets[split], metric_key_prefix=split)
        values = {key[len(split) + 1:]: value for key, value in output.metrics.items()}
        speed[split] = values.pop("samples_per_second")
        metrics[split] = {key: value for key, value in values.items()
                          if key not in ("runtime", "steps_per_second", "model_preparation_time")}
        if not np.array_equal(output.label_ids, np.asarray(datasets[split]["label"])):
            raise RuntimeError("Trainer.predict's labels are not the dataset's, row by row: the predictions written "
                               "per row would belong to other texts")
        outputs[split] = (output.label_ids, *output.predictions)
    return metrics, outputs, speed


@contextmanager
def in_row_order(trainer):
    """Inside the block, the Trainer evaluates a dataset's rows in their order, so that Trainer.predict returns
    one output per row, row by row: its evaluation takes its order from train_sampling_strategy too, and
    group_by_length would return a length-grouped permutation of the rows."""
    strategy = trainer.args.train_sampling_strategy
    trainer.args.train_sampling_strategy = "sequential"
    try:
        yield
    finally:
        trainer.args.train_sampling_strategy = strategy


def peak_memory(device: str) -> dict:
    """Peak resident memory of this process (and of the GPU's allocator), in MB."""
    import resource

    import torch

    memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KB on Linux
    if device == "cuda":
        memory["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return memory


if __name__ == "__main__":
    utils.run_cli(main)
