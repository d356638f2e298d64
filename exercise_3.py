"""Exercise 3: CLIP zero-shot classification on Tiny ImageNet, then LoRA fine-tuning.

A CLIP model classifies each validation image by comparing it with one text feature per class
("a photo of a {class}."): the `zero_shot` stage. LoRA adapters on the attention projections are
then trained with a contrastive `CLIPTrainer` on the train split, and the same zero-shot
classification runs again with class features built from the adapted text tower: the `lora` stage
(`fine_tuned` with lora.enabled=False, which trains every weight instead).

    python exercise_3.py                                          # Hub defaults (needs the Hub)
    python -m tools.build_tiny_clip models/tiny-clip              # offline: a small random-weight CLIP
    python exercise_3.py model_name=models/tiny-clip dataset=../shared/data/tiny-imagenet-200 max_train_samples=2000
    python exercise_3.py ... run_name=r1 resume=True              # continue r1 from its newest checkpoint
    torchrun --nproc_per_node=2 exercise_3.py ...                 # data parallel (DDP), one results.json
    python exercise_3.py --help                                   # every key with its default

Ctrl-C or SIGTERM during training saves a checkpoint and exits; a NaN or infinite loss stops
training before its update, keeping the checkpoints saved until then.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import LoRA
import clip
import devices
import evaluate
import faults
import images
import plots
import probe
import training
import utils

CONFIG = {
    # what to run on: a Hub id or a local folder for each
    "model_name": "openai/clip-vit-base-patch16",  # Hub id or local folder of a CLIP model
    "dataset": "zh-plus/tiny-imagenet",  # or the release folder (wnids.txt, train/, val/), or an ImageFolder
    "class_names": "clip",           # "clip": the CLIP authors' names where known, else "first" WordNet synonym; "all"; or a JSON file {id: name}
    "max_classes": None,             # None = all; else the first N classes
    "max_train_samples": None,       # None = all; subsamples are stratified and seeded
    "max_eval_samples": None,        # None = all; validation and test subsamples, stratified and seeded
    "bad_images": "skip",            # unreadable images: "skip" (warn, count in results.json) or "fail"
    # zero-shot classification
    "prompts": "single",             # "single" ("a photo of a {}."), "ensemble" (8, ours) or "imagenet80" (CLIP's 80); features averaged
    "eval_batch_size": 32,           # images per forward pass when evaluating (on a CPU larger batches outgrow the caches; a GPU may take more)
    # the linear probe: logistic regression on the frozen image features of the train images (probe.py)
    "linear_probe": True,            # fit the probe stages before training (False skips them)
    "probe_features": "pre_projection",  # "pre_projection": the image tower's pooled output, as the CLIP paper probes; "embedding": after the projection
    "probe_shots": [1, 2, 4, 8, 16, "all"],  # train images per class, one probe each (seeded); "all": every image the carve leaves
    "probe_C": [0.001, 0.01, 0.1, 1.0, 10.0, 100.0],  # inverse L2 strengths tried; the best on the carved split is kept
    "probe_validation_fraction": 0.2,  # of each class's train images, carved out to choose C on
    "probe_max_iter": 1000,          # lbfgs iterations per fit
    "cache_features": True,          # reuse the probe's image features from <output_dir>/cache when nothing changed
    # fine-tuning
    "loss": "clip",                  # "clip": in-batch symmetric contrastive (the reference); "class": vs all classes
    "train_template": "a photo of a {}.",  # prompt paired with each training image; {} is its class name
    "augment": True,                 # random flips and crops of training images (reproducible per epoch)
    "learning_rate": 1e-5,           # full fine-tuning (lora.enabled=False); LoRA uses lora.learning_rate
    "num_train_epochs": 1.0,         # passes over the training split
    "max_steps": None,               # None = num_train_epochs decides; else this many optimizer steps
    "batch_size": 64,                # training examples per step and process (global: x processes x accumulation)
    "gradient_accumulation_steps": 1,  # steps whose gradients are summed before one optimizer update
    "weight_decay": 0.0,             # AdamW weight decay
    "warmup": 0.1,                   # < 1: fraction of all steps; >= 1: number of steps
    "lr_scheduler_type": "cosine",   # learning-rate schedule after warmup
    "max_grad_norm": 1.0,            # gradients are clipped to this global norm
    "mixed_precision": "auto",       # auto: bf16 on Ampere+ GPUs, fp16 on older ones, fp32 on CPU; bf16 on CPU only to check dtypes (slow)
    "eval_strategy": "no",           # zero-shot validation during training: "no" | "epoch" | "steps"
    "eval_steps": 200,               # with eval_strategy=steps: evaluate every this many steps
    "logging_steps": 10,             # log the training loss every this many steps
    "save_steps": 200,               # checkpoints (adapters + optimizer) for resume
    "save_total_limit": 2,           # checkpoints kept
    "dataloader_num_workers": "auto",  # processes decoding images while the model works: auto (0 on CPU, a share of the cores on CUDA) or N
    "resume": False,                 # continue run_name from its newest checkpoint
    "resume_changes": False,         # resume even with settings that change training (the run's are in run_config.json)
    # LoRA: low-rank adapters on the attention projections of both towers; False trains every weight
    "lora": {
        "enabled": True,             # train LoRA adapters (True) or every weight (False)
        "r": 8,                      # rank of each adapter
        "alpha": 16,                 # adapter scale alpha/r
        "dropout": 0.1,              # dropout on the adapter input, in [0, 1)
        "target_modules": ["q_proj", "v_proj"],  # roles or module names; text_model.q_proj: one tower only
        "use_rslora": False,         # rank-stabilised scale alpha/sqrt(r) instead of alpha/r
        "modules_to_save": [],       # whole modules trained too, e.g. visual_projection,text_projection
        "learning_rate": 5e-4,       # replaces learning_rate: adapters start at zero and need larger steps
    },
    # adapter interpolation (WiSE-FT): after training, the trained update scaled by each alpha and evaluated again
    "wise_alphas": [0.0, 0.5, 1.0],  # 0 = the model before training, 1 = the trained one; [] skips
    "forgetting_dataset": None,      # another image set (ImageFolder or release folder) scored zero-shot at every alpha
    "num_sample_images": 16,         # in the grid of sample predictions
    # run bookkeeping and logging
    "output_dir": "runs",            # where run folders go
    "run_name": None,                # None = exercise_3-<time>; needed with resume=True
    "overwrite": False,              # replace an existing run folder of the same name
    "seed": 42,                      # seeds Python, NumPy, torch, splits and subsampling
    "wandb_mode": "offline",         # "offline" | "online" | "disabled"
    "wandb_project": "transformer-labs",  # W&B project the run is logged to
    "tensorboard": True,             # TensorBoard event files in <run>/tensorboard
    "trust_remote_code": False,      # run code shipped with a Hub model; only for models you trust
}
CHOICES = {**training.CHOICES, "bad_images": ("skip", "fail"), "prompts": tuple(clip.TEMPLATES),
           "loss": ("clip", "class"), "eval_strategy": ("no", "epoch", "steps"), "probe_features": probe.FEATURES}
POSITIVE = (*training.POSITIVE, "max_classes", "save_steps", "probe_C", "probe_max_iter")
NON_NEGATIVE = (*training.NON_NEGATIVE, "num_sample_images")
FRACTIONS = (*training.FRACTIONS, "probe_validation_fraction")
INTEGERS = (*training.INTEGERS, "max_classes")


def main(argv: list[str] | None = None, callbacks=()):
    """Run exercise 3; `callbacks`: extra TrainerCallbacks. The zero-shot validation during training reaches them
    through on_log (its eval_* metrics), not on_evaluate: the Trainer's own evaluation does not run."""
    from accelerate import PartialState
    from transformers import TrainingArguments

    # 1. config; under torchrun every process runs all of this, only the main one writes results
    config = utils.parse_config(CONFIG, argv or [], CHOICES, POSITIVE, __file__, non_negative=NON_NEGATIVE,
                                fractions=FRACTIONS, integers=INTEGERS)
    device = utils.best_device()
    check_config(config, device)
    precision = devices.precision(config["mixed_precision"], device)         # what the hardware computes natively
    workers = devices.loader_workers(config["dataloader_num_workers"], device)
    utils.set_seed(config["seed"])
    timing = {}
    start = time.perf_counter()
    distributed = PartialState(cpu=device == "cpu")
    main_process = distributed.is_main_process
    if main_process:
        print(f"device: {device}, precision {precision}, {workers} data-loader workers")

    # 2. data: file paths and labels only; images are opened batch by batch when read
    with utils.timed(timing, "load_data"):
        splits = images.load_image_dataset(config["dataset"], config["seed"], config["max_train_samples"],
                                           config["max_eval_samples"], config["max_classes"], config["class_names"])
    names = splits["train"].features["label"].names
    print(f"data: {', '.join(f'{s} {len(d)}' for s, d in splits.items())} images; {len(names)} classes, "
          f"e.g. {names[:5]}")
    other_names = None
    if config["forgetting_dataset"]:        # scored zero-shot with its own class names at every wise_alphas scale
        with utils.timed(timing, "load_forgetting_data"):
            other = images.load_image_dataset(config["forgetting_dataset"], config["seed"], None,
                                              config["max_eval_samples"], None, config["class_names"])["validation"]
        other_names = other.features["label"].names
        print(f"forgetting set: {len(other)} images of {len(other_names)} classes from {config['forgetting_dataset']}")

    # 3. the model (checked before a run folder exists: a text-only model is refused here), the lazy
    #    image transforms and the collator that pairs each image with its class prompt
    with utils.timed(timing, "load_model"):
        model, tokenizer, image_processor = clip.load_clip(config["model_name"], config["trust_remote_code"])
    model.to(distributed.device)
    base_parameters = LoRA.count_parameters(model)[1]
    run_dir, loggers = training.start_trainer_run(config, distributed, "exercise_3")
    plain = clip.ImageTransform(image_processor, config["bad_images"])    # every image that is scored, not trained on
    evaluation = splits["validation"].with_transform(plain)
    train_transform = clip.ImageTransform(image_processor, config["bad_images"],
                                          augment_seed=config["seed"] if config["augment"] else None)
    train_data = splits["train"].with_transform(train_transform)
    collator = clip.ImageTextCollator(tokenizer, names, config["train_template"], clip.text_max_length(model))
    templates = clip.TEMPLATES[config["prompts"]]
    if config["forgetting_dataset"]:
        other_data = other.with_transform(plain)
        other_collator = clip.ImageTextCollator(tokenizer, other_names, config["train_template"],
                                                clip.text_max_length(model))

    # 4. the `zero_shot` stage: the class text features (the zero-shot head) encoded once, then every
    #    validation image scored against them
    results = {}
    # what a run stopped by a signal or a failed write keeps: its checkpoints, and the command that continues
    kept = lambda: f"no results written; {training.resume_hint(run_dir / 'checkpoints', config, run_dir.name)}"
    with utils.timed(timing, "zero_shot"), faults.stage("the zero-shot evaluation", kept):
        classifier = clip.build_zero_shot_classifier(model, tokenizer, names, templates, precision=precision)
        results["zero_shot"] = clip.evaluate_zero_shot(model, classifier, names, evaluation, collator,
                                                       config["eval_batch_size"], workers, desc="zero-shot",
                                                       precision=precision)
    print(f"zero-shot: accuracy {results['zero_shot'].metrics['accuracy']:.4f}, "
          f"{results['zero_shot'].images_per_second} images/s")

    # 5. the `linear_probe` stages (probe.py): the frozen image features of the train images into logistic
    #    regression, C chosen on a split carved from train, one probe per number of images per class in
    #    probe_shots; scored on the same validation images. Features are cached, keyed by what changes them
    probes = {}
    if config["linear_probe"]:
        with utils.timed(timing, "linear_probe"), faults.stage("the linear probe", kept):
            plain_train = splits["train"].with_transform(plain)
            features = probe.cached_image_features(
                run_dir.parent / "cache", config["model_name"], model,
                {"train": (splits["train"], plain_train), "validation": (splits["validation"], evaluation)}, collator,
                config, precision, workers, config["cache_features"], write=main_process)
            found, probes, fit_seconds = probe.probe_stages(
                features["train"], np.asarray(splits["train"]["label"]), features["validation"],
                np.asarray(splits["validation"]["label"]), names, config)
        results.update(found)
        timing.update(fit_seconds)

    # 6. LoRA adapters (or every weight) trained with the contrastive CLIPTrainer
    tuned = "lora" if config["lora"]["enabled"] else "fine_tuned"
    if config["lora"]["enabled"]:
        model = LoRA.apply_lora(model, config["lora"], task_type=None)
    trainable, total = LoRA.count_parameters(model)
    print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")
    # the optimisation, the checkpoints (for resume) and when the zero-shot validation runs during training
    # (clip.ZeroShotEvaluation); reporters, precision, pinned memory and logging as exercise 2's: shared_arguments
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), run_name=run_dir.name, seed=config["seed"],
        learning_rate=training.learning_rate(config), lr_scheduler_type=config["lr_scheduler_type"],
        warmup_steps=config["warmup"], weight_decay=config["weight_decay"], max_grad_norm=config["max_grad_norm"],
        per_device_train_batch_size=config["batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        num_train_epochs=config["num_train_epochs"], max_steps=config["max_steps"] or -1,  # -1: the epochs decide
        save_strategy="steps", save_steps=config["save_steps"], save_total_limit=config["save_total_limit"],
        eval_strategy=config["eval_strategy"],
        eval_steps=config["eval_steps"] if config["eval_strategy"] == "steps" else None,
        per_device_eval_batch_size=config["eval_batch_size"], dataloader_num_workers=workers,
        remove_unused_columns=False,  # the collator needs the `image` and `label` columns the Trainer would drop
        **training.shared_arguments(config, device))
    stop = training.StopOnSignal()
    trainer = clip.CLIPTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=evaluation,
                               data_collator=collator, processing_class=tokenizer, class_names=names,
                               templates=templates, loss=config["loss"],
                               callbacks=[*callbacks, clip.AugmentationEpoch(train_transform), stop.callback()])
    checkpoint = training.resume_checkpoint(config, run_dir / "checkpoints", main_process)
    initial = LoRA.initial_weights(model) if config["wise_alphas"] else {}   # the weights wise_alphas starts from
    with utils.timed(timing, "train"), training.guarded(trainer, stop, run_dir / "checkpoints", config, loggers):
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
    with faults.stage("saving the trained weights", kept):
        if main_process and config["lora"]["enabled"]:
            LoRA.save_adapter(model, run_dir / "adapter")
        elif main_process:              # every weight trained: the whole model, for predict.py, written whole
            faults.replace_whole(run_dir / "model", model.save_pretrained)

    # 7. the trained stage: the same evaluation, its head built anew from the trained text tower
    with utils.timed(timing, "evaluate"), faults.stage(f"the {tuned} evaluation", kept):
        classifier = clip.build_zero_shot_classifier(model, tokenizer, names, templates, precision=precision)
        results[tuned] = clip.evaluate_zero_shot(model, classifier, names, evaluation, collator,
                                                 config["eval_batch_size"], workers, desc=f"zero-shot after {tuned}",
                                                 precision=precision)

    # 8. adapter interpolation (WiSE-FT): the model a fraction alpha of the way from before training (0) to
    #    trained (1), evaluated again, and on the forgetting set: what the adaptation costs elsewhere
    forgetting = {}
    for alpha in config["wise_alphas"]:
        stage = f"{tuned}_scale_{alpha:g}"
        with utils.timed(timing, stage), faults.stage(f"the {stage} evaluation", kept), \
                LoRA.interpolated(model, alpha, initial):
            classifier = clip.build_zero_shot_classifier(model, tokenizer, names, templates, precision=precision)
            results[stage] = clip.evaluate_zero_shot(model, classifier, names, evaluation, collator,
                                                     config["eval_batch_size"], workers, desc=stage, precision=precision)
            if config["forgetting_dataset"]:
                head = clip.build_zero_shot_classifier(model, tokenizer, other_names, templates, precision=precision)
                forgetting[stage] = clip.evaluate_zero_shot(
                    model, head, other_names, other_data, other_collator, config["eval_batch_size"], workers,
                    desc=f"{stage} (forgetting set)", split="forgetting", precision=precision)
    timing["total"] = round(time.perf_counter() - start, 3)
    if not main_process:
        return run_dir

    # 9. plots, logs, results file (main process only)
    with faults.stage("writing the results", kept):
        metrics = {stage: {"validation": result.metrics} for stage, result in results.items()}
        for stage, result in forgetting.items():
            metrics[stage]["forgetting"] = result.metrics
        figures = {
            "per_class_accuracy_change": plots.plot_per_class_change(results["zero_shot"].per_class_recall,
                                                                     results[tuned].per_class_recall, names,
                                                                     run_dir / "per_class_accuracy_change.png"),
            "sample_predictions": plots.plot_sample_predictions(splits["validation"], results["zero_shot"], results[tuned],
                                                                names, run_dir / "sample_predictions.png",
                                                                config["num_sample_images"], config["seed"]),
            # the validation curve starts at the zero-shot score (step 0) and ends at the trained stage's
            "training_curves": plots.plot_training_curves(
                [{"step": 0, **{f"eval_{k}": v for k, v in results["zero_shot"].metrics.items()}},
                 *trainer.state.log_history,
                 {"step": trainer.state.global_step, **{f"eval_{k}": v for k, v in results[tuned].metrics.items()}}],
                run_dir / "training_curves.png"),
            f"confusion_{tuned}": plots.plot_confusion_matrix(results[tuned].confusion, names,
                                                              run_dir / f"confusion_{tuned}_validation.png",
                                                              f"{tuned} on validation"),
        }
        if probes:
            figures["few_shot"] = plots.plot_few_shot(
                [(info["images_per_class"], results[stage].metrics["accuracy"], info["shots"]) for stage, info in probes.items()],
                results["zero_shot"].metrics["accuracy"], run_dir / "few_shot.png")
        if config["wise_alphas"]:
            scales = [metrics[f"{tuned}_scale_{alpha:g}"] for alpha in config["wise_alphas"]]
            figures["interpolation"] = plots.plot_interpolation(
                config["wise_alphas"], {split: [scale[split]["accuracy"] for scale in scales] for split in scales[0]},
                tuned, run_dir / "interpolation.png")
        # step=None: W&B appends these after the Trainer's own steps instead of dropping them as out of order
        for stage in metrics:
            loggers.log_metrics(metrics[stage], prefix=f"{stage}.", step=None)
        for tag, figure in figures.items():
            loggers.log_figure(f"{tuned}/{tag}", figure, step=None)
        paths = list(splits["validation"]["image"])
        for stage, result in results.items():      # per image: its path, true class, top-5 and best probability
            evaluate.write_predictions(run_dir, stage, "validation", result.rows,
                                       [images.image_id(paths[row]) for row in result.rows], result.labels,
                                       result.predictions, result.scores, names, top_k=result.top_k)
        skipped = sorted(set().union(*(result.skipped_images for result in results.values()), trainer.skipped_images))
        if skipped:
            print(f"warning: {len(skipped)} unreadable images were skipped (bad_images=fail stops at the first)",
                  file=sys.stderr)
        model_info = {"name": config["model_name"], "parameters": total, "base_parameters": base_parameters,
                      "trainable_parameters": trainable, "trainable_percent": round(100 * trainable / total, 4),
                      "lora": config["lora"] if config["lora"]["enabled"] else None,
                      "adapter": str(run_dir / "adapter") if config["lora"]["enabled"] else None}
        evaluate.write_results(
            run_dir, "exercise_3", config, metrics, timing, model_info, label_names=names, prompts=list(templates),
            images_per_second={stage: result.images_per_second for stage, result in results.items()},
            most_confused={stage: result.most_confused for stage, result in results.items()},
            per_class_accuracy={stage: dict(zip(names, np.round(result.per_class_recall, 4).tolist()))
                                for stage, result in results.items()},
            confusion_matrices={stage: result.confusion.tolist() for stage, result in results.items()},
            skipped_images={"count": len(skipped), "files": skipped[:50], "policy": config["bad_images"]},
            training={"global_step": trainer.state.global_step, "epochs": trainer.state.epoch, "loss": config["loss"],
                      "train_loss": train_output.metrics.get("train_loss"),
                      "train_samples_per_second": train_output.metrics.get("train_samples_per_second"),
                      "resumed_from": checkpoint, "device": device, "processes": distributed.num_processes,
                      "precision": precision, "dataloader_num_workers": workers},
            linear_probe=probes, interpolation={"alphas": config["wise_alphas"], "of": tuned,
                                                "forgetting_dataset": config["forgetting_dataset"],
                                                "forgetting_label_names": other_names},
            data_sizes={split: len(dataset) for split, dataset in splits.items()}, log_history=trainer.state.log_history)
    loggers.finish()
    confused = ", ".join(f"{pair['true']} -> {pair['predicted']} ({pair['count']})"
                         for pair in results[tuned].most_confused[:3])
    table = evaluate.results_table(metrics, columns=("accuracy", "top5_accuracy", "f1_macro", "mean_per_class_recall"))
    print(f"\n{table}\n\nmost confused after {tuned}: {confused or '-'}\n"
          f"zero-shot images/s: {results['zero_shot'].images_per_second} before, "
          f"{results[tuned].images_per_second} after\nrun folder: {run_dir}")
    return run_dir


def check_config(config: dict, device: str) -> None:
    """The shared Trainer checks, plus this exercise's own."""
    training.check_config(config, device, checkpoints="checkpoints")
    if "{}" not in config["train_template"]:
        raise utils.LabError(f"train_template needs a {{}} for the class name, got {config['train_template']!r}")
    shots = config["probe_shots"]
    if config["linear_probe"] and (not shots or any(k != "all" and (type(k) is not int or k < 1) for k in shots)):
        raise utils.LabError(f"probe_shots: each entry is a number of train images per class (>= 1) or 'all', got {shots}")
    alphas = config["wise_alphas"]
    if any(type(a) not in (int, float) or not 0 <= a < float("inf") for a in alphas) or len(set(alphas)) < len(alphas):
        raise utils.LabError(f"wise_alphas: distinct scales >= 0 (0 = before training, 1 = trained) or [], got {alphas}")


if __name__ == "__main__":
    utils.run_cli(main)
