"""Exercise 3: CLIP zero-shot classification on Tiny ImageNet, then LoRA fine-tuning.

A CLIP model classifies each validation image by comparing it with one text feature per class
("a photo of a {class}."): the `zero_shot` stage. LoRA adapters on the attention projections are
then trained with a contrastive `CLIPTrainer` on the train split, and the same zero-shot
classification runs again with class features re-encoded by the adapted text tower: the `lora` stage.

    python exercise_3.py                                          # Hub defaults (needs the Hub)
    python -m tools.build_tiny_clip models/tiny-clip                 # offline: a small random-weight CLIP
    python exercise_3.py model_name=models/tiny-clip dataset=../shared/data/tiny-imagenet-200 max_train_samples=2000
    python exercise_3.py ... run_name=r1 resume=True              # continue r1 from its newest checkpoint
    python exercise_3.py --help                                   # every key with its default

Ctrl-C or SIGTERM during training saves a checkpoint and exits; a NaN or infinite loss stops
training before its update, keeping the checkpoints saved until then.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import LoRA
import clip
import data
import evaluate
import training
import utils


CONFIG = {
    # what to run on: a Hub id or a local folder for each
    "model_name": "openai/clip-vit-base-patch16",
    "dataset": "zh-plus/tiny-imagenet",  # or the release folder (wnids.txt, train/, val/), or an ImageFolder
    "class_names": "first",          # "first" WordNet synonym, "all" synonyms, or a JSON file {id: name}
    "max_classes": None,             # None = all; else the first N classes
    "max_train_samples": None,       # None = all; subsamples are stratified and seeded
    "max_eval_samples": None,
    "bad_images": "skip",            # unreadable images: "skip" (warn, count in results.json) or "fail"
    # zero-shot classification
    "prompts": "single",             # "single" ("a photo of a {}.") or "ensemble" (features averaged)
    "eval_batch_size": 128,
    # fine-tuning
    "loss": "clip",                  # "clip": in-batch symmetric contrastive (the reference); "class": vs all classes
    "train_template": "a photo of a {}.",
    "augment": True,                 # random flips and crops of training images (reproducible per epoch)
    "learning_rate": 5e-4,
    "num_train_epochs": 1.0,
    "max_steps": None,               # None = num_train_epochs decides; else this many optimizer steps
    "batch_size": 64,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0.0,
    "warmup": 0.1,                   # < 1: fraction of all steps; >= 1: number of steps
    "lr_scheduler_type": "cosine",
    "max_grad_norm": 1.0,
    "mixed_precision": "auto",       # auto: bf16 on CUDA, fp32 on CPU
    "eval_strategy": "no",           # zero-shot validation during training: "no" | "epoch" | "steps"
    "eval_steps": 200,
    "logging_steps": 20,
    "save_steps": 200,               # checkpoints (adapters + optimizer) for resume
    "save_total_limit": 2,
    "dataloader_num_workers": 0,
    "resume": False,                 # continue run_name from its newest checkpoint
    "lora": {
        "r": 8,
        "alpha": 16,
        "dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "towers": "both",            # "vision" | "text" | "both"
        "use_rslora": False,
        "modules_to_save": [],       # whole modules trained too, e.g. visual_projection,text_projection
    },
    "num_sample_images": 16,         # in the grid of sample predictions
    # run bookkeeping and logging
    "output_dir": "runs",
    "run_name": None,                # None = exercise_3-<time>; needed with resume=True
    "overwrite": False,
    "seed": 42,
    "wandb_mode": "offline",         # "offline" | "online" | "disabled"
    "wandb_project": "transformer-labs",
    "tensorboard": True,
    "trust_remote_code": False,
}
CHOICES = {"bad_images": ("skip", "fail"), "prompts": tuple(clip.TEMPLATES), "loss": ("clip", "class"),
           "lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup"),
           "mixed_precision": ("auto", "no", "bf16", "fp16"), "eval_strategy": ("no", "epoch", "steps"),
           "lora.towers": tuple(LoRA.CLIP_TOWERS), "wandb_mode": ("offline", "online", "disabled")}
POSITIVE = ("max_classes", "max_train_samples", "max_eval_samples", "eval_batch_size", "learning_rate",
            "num_train_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "eval_steps",
            "logging_steps", "save_steps", "save_total_limit", "lora.r", "lora.alpha")


def check_config(config: dict, device: str) -> None:
    """The checks parse_config's `positive` cannot express."""
    training.trainer_precision(config["mixed_precision"], device)
    for key in ("weight_decay", "warmup", "max_grad_norm", "dataloader_num_workers", "num_sample_images"):
        if config[key] < 0:
            raise utils.LabError(f"{key!r} must be >= 0, got {config[key]!r}")
    if not 0 <= config["lora"]["dropout"] < 1:
        raise utils.LabError(f"'lora.dropout' must be in [0, 1), got {config['lora']['dropout']!r}")
    if "{}" not in config["train_template"]:
        raise utils.LabError(f"train_template needs a {{}} for the class name, got {config['train_template']!r}")
    if config["resume"] and not config["run_name"]:
        raise utils.LabError("resume=True needs run_name=<the run to continue> (its folder under output_dir)")


def training_arguments(config: dict, run_dir: Path, device: str):
    from transformers import TrainingArguments

    precision = training.trainer_precision(config["mixed_precision"], device)
    report_to = training.trainer_reporters(config)
    steps = config["eval_strategy"] == "steps"
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), run_name=run_dir.name, report_to=report_to or "none",
        seed=config["seed"], learning_rate=config["learning_rate"], num_train_epochs=config["num_train_epochs"],
        max_steps=config["max_steps"] or -1, per_device_train_batch_size=config["batch_size"],
        per_device_eval_batch_size=config["eval_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"], weight_decay=config["weight_decay"],
        warmup_steps=config["warmup"], lr_scheduler_type=config["lr_scheduler_type"],
        max_grad_norm=config["max_grad_norm"], bf16=precision == "bf16", fp16=precision == "fp16",
        eval_strategy=config["eval_strategy"], eval_steps=config["eval_steps"] if steps else None,
        save_strategy="steps", save_steps=config["save_steps"], save_total_limit=config["save_total_limit"],
        logging_strategy="steps", logging_steps=config["logging_steps"],
        # the collator needs the `image` and `label` columns the Trainer would otherwise drop
        remove_unused_columns=False, label_names=["labels"],
        dataloader_num_workers=config["dataloader_num_workers"], dataloader_pin_memory=device == "cuda",
        use_cpu=device == "cpu")


def plot_per_class_change(before: np.ndarray, after: np.ndarray, names: list[str], path: Path, show: int = 15):
    """Per-class accuracy after minus before: all classes, or the `show` largest gains and losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    change = np.nan_to_num(after - before)
    order = np.argsort(change)
    if len(order) > 2 * show:
        order = np.concatenate([order[:show], order[-show:]])
    figure, axis = plt.subplots(figsize=(8, 0.25 * len(order) + 1.5))
    axis.barh(range(len(order)), change[order], color=["tab:green" if c >= 0 else "tab:red" for c in change[order]])
    axis.set_yticks(range(len(order)), [names[i] for i in order], fontsize=8)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("accuracy change (lora - zero_shot)")
    axis.set_title(f"per-class accuracy change, mean {np.nanmean(after - before):+.3f}"
                   + (f" ({show} largest gains and losses)" if len(change) > 2 * show else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure


def plot_sample_predictions(raw_dataset, results: dict, names: list[str], path: Path, count: int, seed: int):
    """A grid of validation images titled true class / zero-shot / LoRA prediction; green when the
    LoRA prediction is right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = results["zero_shot"], results["lora"]
    picked = np.random.default_rng(seed).choice(len(after.rows), size=min(count, len(after.rows)), replace=False)
    columns = int(np.ceil(np.sqrt(len(picked))))
    rows = int(np.ceil(len(picked) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    zero_shot_by_row = dict(zip(before.rows.tolist(), before.predictions.tolist()))
    for axis in axes.flat:
        axis.axis("off")
    for axis, position in zip(axes.flat, picked):
        row, label, predicted = int(after.rows[position]), after.labels[position], after.predictions[position]
        axis.imshow(data.open_rgb(raw_dataset[row]["image"]))
        axis.set_title(f"{names[label][:18]}\nzs: {names[zero_shot_by_row[row]][:16]}\nlora: {names[predicted][:16]}",
                       fontsize=7, color="tab:green" if predicted == label else "tab:red")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure


def main(argv: list[str] | None = None, callbacks=()):
    """Run exercise 3; `callbacks`: extra TrainerCallbacks (e.g. EarlyStoppingCallback)."""
    from accelerate import PartialState

    # 1. config; under torchrun every process runs all of this, only the main one writes results
    config = utils.parse_config(CONFIG, argv or [], CHOICES, POSITIVE, "exercise_3.py")
    device = utils.best_device()
    check_config(config, device)
    utils.set_seed(config["seed"])
    timing = {}
    start = time.perf_counter()
    distributed = PartialState(cpu=device == "cpu")
    main_process = distributed.is_main_process

    # 2. data: file paths and labels only; images are opened batch by batch when read
    with utils.timed(timing, "load_data"):
        splits = data.load_image_dataset(config["dataset"], config["seed"], config["max_train_samples"],
                                       config["max_eval_samples"], config["max_classes"], config["class_names"])
    names = splits["train"].features["label"].names
    print(f"data: {', '.join(f'{s} {len(d)}' for s, d in splits.items())} images; {len(names)} classes, "
          f"e.g. {names[:5]}")

    # 3. the model (checked before a run folder exists: a text-only model is refused here)
    with utils.timed(timing, "load_model"):
        model, tokenizer, image_processor = clip.load_clip(config["model_name"], config["trust_remote_code"])
    model.to(distributed.device)
    base_parameters = LoRA.count_parameters(model)[1]
    run_dir, loggers = training.start_trainer_run(config, distributed, "exercise_3")
    evaluation = splits["validation"].with_transform(clip.ImageTransform(image_processor, config["bad_images"]))
    train_transform = clip.ImageTransform(image_processor, config["bad_images"],
                                          augment_seed=config["seed"] if config["augment"] else None)
    train_data = splits["train"].with_transform(train_transform)
    collator = clip.ImageTextCollator(tokenizer, names, config["train_template"], clip.text_max_length(model))
    classifier = clip.ZeroShotClassifier(model, tokenizer, names, clip.TEMPLATES[config["prompts"]])

    # 4. the `zero_shot` stage: class features encoded once, every validation image scored against them
    results = {}
    with utils.timed(timing, "zero_shot"):
        results["zero_shot"] = clip.evaluate_zero_shot(classifier, evaluation, collator, config["eval_batch_size"],
                                                       config["dataloader_num_workers"], desc="zero-shot")
    print(f"zero-shot: accuracy {results['zero_shot'].metrics['accuracy']:.4f}, "
          f"{results['zero_shot'].images_per_second} images/s")

    # 5. LoRA adapters and contrastive fine-tuning
    model = LoRA.apply_lora(model, config["lora"], task_type=None)
    classifier.model = model
    trainable, total = LoRA.count_parameters(model)
    print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")
    stop = training.StopOnSignal()
    trainer = clip.CLIPTrainer(model=model, args=training_arguments(config, run_dir, device), train_dataset=train_data,
                               eval_dataset=evaluation, data_collator=collator, loss=config["loss"],
                               zero_shot=classifier,
                               callbacks=[*callbacks, clip.AugmentationEpoch(train_transform), stop.callback()])
    checkpoint = training.latest_checkpoint(run_dir / "checkpoints") if config["resume"] else None
    if config["resume"]:
        print(f"resuming from {checkpoint}" if checkpoint else f"resume: no checkpoint in {run_dir}; starting afresh")
    try:
        with utils.timed(timing, "train"), stop:
            train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except training.NonFiniteLossError as error:
        if loggers:
            loggers.finish()
        kept = training.latest_checkpoint(run_dir / "checkpoints")
        raise utils.LabError(f"training stopped: {error}; the update was not applied and "
                             f"{f'the last good checkpoint is {kept}' if kept else 'no checkpoint had been saved yet'}. "
                             f"Lower learning_rate or max_grad_norm and run again") from None
    if stop.received:
        if loggers:
            loggers.finish()
        stop.exit(trainer.state.global_step, training.latest_checkpoint(run_dir / "checkpoints"), run_dir,
                  config["output_dir"])
    if main_process:
        LoRA.save_adapter(model, run_dir / "adapter")

    # 6. the `lora` stage: the same evaluation; the classifier sees the changed text tower and re-encodes
    encodings = classifier.encodings
    with utils.timed(timing, "evaluate"):
        results["lora"] = clip.evaluate_zero_shot(classifier, evaluation, collator, config["eval_batch_size"],
                                                  config["dataloader_num_workers"], desc="zero-shot after LoRA")
    timing["total"] = round(time.perf_counter() - start, 3)
    if not main_process:
        return run_dir
    if classifier.encodings > encodings:
        print("class text features re-encoded: the text tower changed during training")

    # 7. plots, logs, results file (main process only)
    step = trainer.state.global_step
    metrics = {stage: {"validation": result.metrics} for stage, result in results.items()}
    figures = {
        "per_class_accuracy_change": plot_per_class_change(results["zero_shot"].per_class_recall,
                                                           results["lora"].per_class_recall, names,
                                                           run_dir / "per_class_accuracy_change.png"),
        "sample_predictions": plot_sample_predictions(splits["validation"], results, names,
                                                      run_dir / "sample_predictions.png",
                                                      config["num_sample_images"], config["seed"]),
        "training_curves": evaluate.plot_training_curves(trainer.state.log_history, run_dir / "training_curves.png"),
        "confusion_lora": evaluate.plot_confusion_matrix(results["lora"].confusion, names,
                                                         run_dir / "confusion_lora_validation.png", "LoRA on validation"),
    }
    # step=None: W&B appends these after the Trainer's own steps instead of dropping them as out of order
    for stage in metrics:
        loggers.log_metrics(metrics[stage], prefix=f"{stage}.", step=None)
    for tag, figure in figures.items():
        loggers.log_figure(f"lora/{tag}", figure, step=None)
    skipped = sorted(set().union(*(result.skipped_images for result in results.values()), trainer.skipped_images))
    if skipped:
        print(f"warning: {len(skipped)} unreadable images were skipped (bad_images=fail stops at the first)",
              file=sys.stderr)
    model_info = {"name": config["model_name"], "parameters": base_parameters, "total_parameters": total,
                  "trainable_parameters": trainable, "trainable_percent": round(100 * trainable / total, 4),
                  "lora": config["lora"], "adapter": str(run_dir / "adapter")}
    evaluate.write_results(
        run_dir, "exercise_3", config, metrics, timing, model_info, label_names=names,
        prompts=list(clip.TEMPLATES[config["prompts"]]),
        images_per_second={stage: result.images_per_second for stage, result in results.items()},
        most_confused={stage: result.most_confused for stage, result in results.items()},
        per_class_accuracy={stage: dict(zip(names, np.round(result.per_class_recall, 4).tolist()))
                            for stage, result in results.items()},
        confusion_matrices={stage: result.confusion.tolist() for stage, result in results.items()},
        skipped_images={"count": len(skipped), "files": skipped[:50], "policy": config["bad_images"]},
        class_feature_encodings=classifier.encodings,
        training={"global_step": step, "epochs": trainer.state.epoch, "loss": config["loss"],
                  "train_loss": train_output.metrics.get("train_loss"),
                  "train_samples_per_second": train_output.metrics.get("train_samples_per_second"),
                  "resumed_from": str(checkpoint) if checkpoint else None, "device": device,
                  "processes": distributed.num_processes},
        data_sizes={split: len(dataset) for split, dataset in splits.items()}, log_history=trainer.state.log_history)
    loggers.finish()
    confused = ", ".join(f"{pair['true']} -> {pair['predicted']} ({pair['count']})"
                         for pair in results["lora"].most_confused[:3])
    table = evaluate.results_table(metrics, columns=("accuracy", "top5_accuracy", "f1_macro", "mean_per_class_recall"))
    print(f"\n{table}\n\nmost confused after LoRA: {confused or '-'}\n"
          f"zero-shot images/s: {results['zero_shot'].images_per_second} before, {results['lora'].images_per_second} after\n"
          f"run folder: {run_dir}")
    return run_dir


if __name__ == "__main__":
    utils.run_cli(main)
