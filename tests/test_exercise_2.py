"""Exercise 2: tokenization and dynamic padding, Trainer metrics, a smoke run with both loggers,
interruption and resume, the NaN guard, torchrun with two CPU processes, and (slow) real MiniLM
fine-tuning that must beat its own untrained stage."""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, EvalPrediction, TrainingArguments

import data
import evaluate
import exercise_2
import training
import utils
from conftest import PoisonAtStep, read_results, SignalAtStep, torchrun_two_processes, write_csv_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_args(model: str, dataset, output_dir, **overrides) -> list[str]:
    """A few seconds of training: 96 examples, 12 steps per epoch, an evaluation every 4 steps."""
    config = {"model_name": model, "dataset": dataset, "output_dir": output_dir, "max_train_samples": 96,
              "max_eval_samples": 32, "batch_size": 8, "eval_batch_size": 32, "learning_rate": 1e-2,
              "num_train_epochs": 2, "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 2,
              "warmup": 0, "wandb_mode": "disabled", "tensorboard": False, "seed": 0}
    config.update(overrides)
    return [f"{key}={value}" for key, value in config.items()]


def checkpoints(run_dir) -> list[str]:
    return sorted((path.name for path in run_dir.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------

def test_tokenize_leaves_padding_to_the_collator(tiny_distilbert, rt_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_distilbert)
    splits = data.load_text_dataset(str(rt_dir), seed=0, max_train_samples=40, max_eval_samples=20)
    tokenized = exercise_2.tokenize(splits, tokenizer, max_length=24)
    assert set(tokenized["train"].column_names) == {"input_ids", "attention_mask", "label"}
    lengths = [len(ids) for ids in tokenized["train"]["input_ids"]]
    assert len(set(lengths)) > 1 and max(lengths) <= 24  # truncated, not padded
    assert list(tokenized["test"]["label"]) == list(splits["test"]["label"])

    features = [tokenized["train"][i] for i in range(8)]
    longest = max(len(feature["input_ids"]) for feature in features)
    batch = exercise_2.make_collator(tokenizer, "cpu")(features)
    assert batch["input_ids"].shape == (8, longest)
    assert batch["attention_mask"].sum(1).tolist() == [len(feature["input_ids"]) for feature in features]
    assert batch["labels"].tolist() == [feature["label"] for feature in features]
    short = [feature for feature in features if len(feature["input_ids"]) < longest][:3]
    assert exercise_2.make_collator(tokenizer, "cpu")(short)["input_ids"].shape[1] < longest
    assert exercise_2.make_collator(tokenizer, "cuda")(features)["input_ids"].shape[1] == -(-longest // 8) * 8


def test_trainer_metrics_on_hand_computed_example():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([1, 0, 0, 0])  # predictions 1 0 1 0
    ids, scores = evaluate.preprocess_logits_for_metrics(logits, None)
    assert ids.tolist() == [1, 0, 1, 0]
    assert scores.tolist() == pytest.approx(logits.softmax(-1).max(-1).values.tolist())
    for predictions in ((ids.numpy(), scores.numpy()), ids.numpy(), logits.numpy()):
        metrics = evaluate.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
        assert metrics["accuracy"] == pytest.approx(0.75)
        assert metrics["precision_macro"] == pytest.approx((1.0 + 0.5) / 2)
        assert metrics["recall_macro"] == pytest.approx((2 / 3 + 1.0) / 2)
        assert metrics["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_the_loss_policy_flags_nan_and_inf_losses_only():
    training.check_loss(torch.tensor(0.7), 1)
    with pytest.raises(training.NonFiniteLossError, match=r"at step 2 \(inf\)"):
        training.check_loss(torch.tensor(float("inf")), 2)
    with pytest.raises(training.NonFiniteLossError, match=r"at step 3 \(nan\)"):
        training.check_loss(torch.tensor(float("nan")), 3)


class MeanLoss(torch.nn.Module):
    """A model whose forward takes loss kwargs, as transformers 5's models do, and returns its batch mean whatever
    they say (as DistilBERT's classifier does); `kwargs`: the names of those it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.kwargs = set()

    def forward(self, x, labels=None, **kwargs):
        self.kwargs |= set(kwargs)
        return {"loss": (self.weight * x).mean()}


def mean_loss_trainer(tmp_path, **arguments):
    """A LabTrainer on MeanLoss: 4 rows of x = 1 (loss 1), plain SGD at learning rate 1."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2,
                             learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0,
                             logging_steps=1, save_strategy="no", label_names=["labels"], **arguments)
    rows = [{"x": torch.tensor(1.0), "labels": 0}] * 4
    return training.LabTrainer(model=MeanLoss(), args=args, train_dataset=rows, eval_dataset=rows)


def test_every_loss_is_the_batch_mean_also_with_gradient_accumulation(tmp_path):
    """Given num_items_in_batch, a model that ignores it would log, and step by, twice its loss here (and under DDP
    the Trainer would multiply it by the number of processes)."""
    trainer = mean_loss_trainer(tmp_path, max_steps=1, gradient_accumulation_steps=2, disable_tqdm=True)
    trainer.train()
    assert trainer.model.kwargs == set()
    assert trainer.state.log_history[0]["loss"] == 1.0
    assert trainer.model.weight.item() == 0.0            # 1 - 1 x the gradient of the mean over both batches


def test_progress_is_a_labelled_bar_and_one_readable_line_per_log(tmp_path, capsys):
    trainer = mean_loss_trainer(tmp_path, max_steps=2, prediction_loss_only=True)
    trainer.train()
    trainer.evaluate()
    out, err = capsys.readouterr()
    assert "step 1/2 (epoch 0.50): loss 1, grad_norm 1, learning_rate 1" in out.splitlines()
    assert "train: 100%" in err and "evaluate: 100%" in err and "{'loss'" not in out + err


def test_predictions_come_back_in_row_order_when_training_groups_by_length(tiny_distilbert, rt_dir, tmp_path):
    splits = data.load_text_dataset(str(rt_dir), seed=0, max_train_samples=40, max_eval_samples=64)
    utils.set_seed(0)
    model, tokenizer = exercise_2.load_sequence_classifier(tiny_distilbert, splits["train"].features["label"].names)
    tokenized = exercise_2.tokenize(splits, tokenizer, 128)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=4,
                             train_sampling_strategy="group_by_length")
    trainer = training.LabTrainer(model=model, args=args, processing_class=tokenizer,
                                  data_collator=exercise_2.make_collator(tokenizer, "cpu"),
                                  compute_metrics=evaluate.compute_metrics,
                                  preprocess_logits_for_metrics=evaluate.preprocess_logits_for_metrics)
    labels, predicted, scores = exercise_2.evaluate_stage(trainer, tokenized)[1]["test"]
    assert labels.tolist() == list(splits["test"]["label"])
    batch = tokenizer(list(splits["test"]["text"]), truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = model.eval()(**batch).logits.softmax(-1)
    assert predicted.tolist() == probabilities.argmax(-1).tolist()
    assert scores.tolist() == pytest.approx(probabilities.max(-1).values.tolist(), rel=1e-4)
    assert args.train_sampling_strategy == "group_by_length"     # as training wants it, after the evaluation


def test_lora_wrapping_is_quiet_and_leaves_the_warning_filters_alone(tiny_distilbert):
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` as it wraps a model: that warning is
    silenced there and only there."""
    import warnings

    import LoRA

    message = "`is_gradient_checkpointing` is deprecated"
    assert not any(regex is not None and "is_gradient_checkpointing" in regex.pattern
                   for _, regex, *_ in warnings.filters)
    model, _ = exercise_2.load_sequence_classifier(tiny_distilbert, ["negative", "positive"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoRA.apply_lora(model, exercise_2.CONFIG["lora"])
    assert not [warning for warning in caught if message in str(warning.message)]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(utils.LabError, match="resume=True needs run_name"):
        exercise_2.main([f"output_dir={tmp_path}", "resume=True"])
    with pytest.raises(utils.LabError, match="metric_for_best_model"):
        exercise_2.main([f"output_dir={tmp_path}", "metric_for_best_model=bleu"])
    with pytest.raises(utils.LabError, match="lora.dropout"):
        exercise_2.main([f"output_dir={tmp_path}", "lora.dropout=1.5"])


def test_bad_inputs_fail_before_a_run_folder_exists(tiny_distilbert, rt_dir, tmp_path):
    from transformers import CLIPConfig

    with pytest.raises(utils.LabError, match="does not exist"):
        exercise_2.main(tiny_args(tiny_distilbert, tmp_path / "no-such-data", tmp_path / "runs"))
    clip = tmp_path / "clip"
    CLIPConfig().save_pretrained(clip)
    with pytest.raises(utils.LabError, match="vision"):
        exercise_2.main(tiny_args(str(clip), rt_dir, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Whole runs on the tiny random DistilBERT
# ---------------------------------------------------------------------------------------------

def test_smoke_run_with_tensorboard_and_wandb(tiny_distilbert, rt_dir, tmp_path):
    run_dir = exercise_2.main(tiny_args(tiny_distilbert, rt_dir, tmp_path, run_name="smoke", max_steps=8,
                                        wandb_mode="offline", tensorboard=True, save_total_limit=1))
    results = read_results(run_dir)
    assert results["exercise"] == "exercise_2" and results["report_to"] == ["tensorboard", "wandb"]
    for stage in ("pretrained", "fine_tuned"):
        for split in ("validation", "test"):
            values = results["metrics"][stage][split]
            assert {"loss", "accuracy", "f1_macro"} <= set(values) and 0 <= values["accuracy"] <= 1
            assert np.sum(evaluate.read_confusion_matrices(run_dir)[stage][split]) == 32
    assert results["training"]["global_step"] == 8
    assert results["model"]["trainable_parameters"] == results["model"]["parameters"] > 0
    # the best checkpoint is the first with the highest validation accuracy (the default metric_for_best_model;
    # a tie is no improvement, and max() also keeps the first), and it is what was tested
    evaluations = [entry for entry in results["log_history"] if "eval_accuracy" in entry]
    best = max(evaluations, key=lambda entry: entry["eval_accuracy"])
    assert results["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert results["metrics"]["fine_tuned"]["validation"]["accuracy"] == pytest.approx(best["eval_accuracy"])
    assert results["metrics"]["fine_tuned"]["validation"]["loss"] == pytest.approx(best["eval_loss"], rel=1e-5)
    assert len(checkpoints(run_dir)) <= 2  # save_total_limit=1 keeps the best (plus the newest while training)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "training_curves.png").stat().st_size > 0
    assert (run_dir / "confusion_fine_tuned_test.png").stat().st_size > 0


def test_sigterm_then_resume_matches_an_uninterrupted_run(tiny_distilbert, rt_dir, tmp_path):
    # batch_size=1 makes 60 steps per epoch and length-grouped "megabatches" of 50 examples, so the
    # random order of epoch 2 decides what the resumed run sees
    args = tiny_args(tiny_distilbert, rt_dir, tmp_path, max_train_samples=60, batch_size=1, eval_steps=20,
                     logging_steps=10, learning_rate=3e-3, evaluate_pretrained=False)
    uninterrupted = read_results(exercise_2.main(args + ["run_name=whole"]))

    # SIGTERM during step 77 (epoch 2, between evaluations): step 78 finishes and is checkpointed
    with pytest.raises(SystemExit) as stopped:
        exercise_2.main(args + ["run_name=cut"], callbacks=[SignalAtStep(77, signal.SIGTERM)])
    assert stopped.value.code == 128 + signal.SIGTERM
    run_dir = tmp_path / "cut"
    assert "checkpoint-78" in checkpoints(run_dir) and not (run_dir / "results.json").exists()

    resumed = read_results(exercise_2.main(args + ["run_name=cut", "resume=True"]))
    assert resumed["training"]["resumed_from"].endswith("checkpoint-78")
    assert resumed["training"]["global_step"] == uninterrupted["training"]["global_step"] == 120
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["best_metric"] == uninterrupted["best_metric"]
    assert resumed["best_checkpoint"].rsplit("-", 1)[1] == uninterrupted["best_checkpoint"].rsplit("-", 1)[1]


def test_resume_refuses_settings_that_change_training(tiny_distilbert, rt_dir, tmp_path, capsys):
    """The run folder records the config its training started with; resume=True compares with it."""
    args = tiny_args(tiny_distilbert, rt_dir, tmp_path, run_name="r", max_steps=2, eval_steps=2,
                     evaluate_pretrained=False)
    run_dir = exercise_2.main(args)
    recorded = json.loads((run_dir / training.RUN_CONFIG).read_text())
    assert recorded == utils.parse_config(exercise_2.CONFIG, args, exercise_2.CHOICES, exercise_2.POSITIVE)
    assert not list(run_dir.glob(".*.tmp"))
    other_model = tmp_path / "other-model"
    other_model.mkdir()
    for changes, listed in (
        (["learning_rate=0.001"], ["learning_rate 0.01 -> 0.001"]),
        (["seed=1", "lora.r=4", "max_length=64", "batch_size=4"],
         ["seed 0 -> 1", "lora.r 8 -> 4", "max_length 128 -> 64", "batch_size 8 -> 4"]),
        ([f"model_name={other_model}", f"dataset={tmp_path}"], ["model_name '", f"-> '{other_model}'", "dataset '"]),
        (["text_column=sentence", "label_column=topic", "max_train_samples=48"],
         ["text_column 'text' -> 'sentence'", "label_column 'label' -> 'topic'", "max_train_samples 96 -> 48"]),
        (["lora.enabled=true", "lora.dropout=0"], ["lora.enabled False -> True", "lora.dropout 0.1 -> 0.0"]),
    ):
        with pytest.raises(utils.LabError) as error:
            exercise_2.main([*args, *changes, "resume=True"])
        message = str(error.value)
        assert message.startswith("resume=True with settings that change training: ") and "\n" not in message
        assert all(item in message for item in listed), (listed, message)
        assert "resume_changes=True" in message and str(run_dir) in message

    def check(*changes):
        training.check_config(utils.parse_config(exercise_2.CONFIG, [*args, *changes, "resume=True"]), "cpu")
        return capsys.readouterr().err

    capsys.readouterr()
    # what only changes logging, evaluation or where the run lives may change
    assert check("logging_steps=1", "eval_batch_size=8", "wandb_mode=offline", "tensorboard=true",
                 "evaluate_pretrained=true", "save_total_limit=1", "overwrite=false") == ""
    assert "learning_rate 0.01 -> 0.001" in check("learning_rate=0.001", "resume_changes=true")
    (run_dir / training.RUN_CONFIG).unlink()  # a run folder from before run_config.json existed
    warning = check("learning_rate=0.001")
    assert warning.startswith("warning: cannot check") and "run_config.json is missing" in warning
    assert check("run_name=never-started") == ""  # nothing to continue: starts afresh


def test_changed_resume_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    args = [f"output_dir={tmp_path}", "run_name=r", "dataset=/no/such/data"]
    (tmp_path / "r").mkdir()
    recorded = utils.parse_config(exercise_2.CONFIG, args)
    (tmp_path / "r" / training.RUN_CONFIG).write_text(json.dumps(recorded))
    result = subprocess.run([sys.executable, "exercise_2.py", *args, "resume=true", "learning_rate=1e-4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: resume=True with settings that change training: "
                                    f"learning_rate {exercise_2.CONFIG['learning_rate']} -> 0.0001")
    assert result.stderr.strip().count("\n") == 0


def test_sigint_saves_a_checkpoint_and_exits(tiny_distilbert, rt_dir, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        exercise_2.main(tiny_args(tiny_distilbert, rt_dir, tmp_path, run_name="ctrl-c", eval_strategy="epoch",
                                  evaluate_pretrained=False), callbacks=[SignalAtStep(2, signal.SIGINT)])
    assert stopped.value.code == 128 + signal.SIGINT
    assert checkpoints(tmp_path / "ctrl-c") == ["checkpoint-3"]
    # the cut-short epoch was not evaluated as if it had finished (a resumed run would then pick its best
    # checkpoint among different evaluations than an uninterrupted one)
    state = json.loads((tmp_path / "ctrl-c" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and not any("eval_loss" in entry for entry in state["log_history"])
    assert signal.getsignal(signal.SIGINT) is handler  # the usual Ctrl-C behaviour is back


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_distilbert, rt_dir, tmp_path):
    # evaluations and saves at steps 4, 8, ...; the weights turn NaN after step 6, so step 7's loss is NaN
    with pytest.raises(utils.LabError, match=r"NaN or infinite at step 7.*checkpoint-4"):
        exercise_2.main(tiny_args(tiny_distilbert, rt_dir, tmp_path, run_name="diverged", evaluate_pretrained=False),
                        callbacks=[PoisonAtStep(6, lambda model: model.get_input_embeddings().weight)])
    run_dir = tmp_path / "diverged"
    assert checkpoints(run_dir) == ["checkpoint-4"] and not (run_dir / "results.json").exists()
    from safetensors.torch import load_file

    weights = load_file(run_dir / "checkpoint-4" / "model.safetensors")
    assert all(bool(tensor.isfinite().all()) for tensor in weights.values())


def test_torchrun_two_cpu_processes_write_one_result(tiny_distilbert, tmp_path):
    """DDP over gloo on a 4-class CSV with string labels; only the main process writes."""
    dataset = write_csv_dataset(tmp_path / "topics", num_classes=4, per_class=24)
    output_dir = tmp_path / "runs"
    results, run_dir = torchrun_two_processes("exercise_2.py", tiny_args(
        tiny_distilbert, dataset, output_dir, text_column="sentence", label_column="topic", max_eval_samples=None,
        max_steps=6, wandb_mode="offline", tensorboard=True), output_dir, timeout=300)
    assert results["training"]["processes"] == 2 and results["training"]["global_step"] == 6
    assert results["label_names"] == ["music", "politics", "science", "sports"]  # sorted string labels
    matrix = np.asarray(evaluate.read_confusion_matrices(run_dir)["fine_tuned"]["test"])
    assert matrix.shape == (4, 4) and matrix.sum() == results["data_sizes"]["test"]  # each example once
    rows = evaluate.read_predictions(run_dir / "predictions" / "fine_tuned_test.csv")   # gathered once, in order
    assert [row["id"] for row in rows] == list(range(results["data_sizes"]["test"]))
    accuracy = np.mean([row["label"] == row["predicted"] for row in rows])
    assert accuracy == pytest.approx(results["metrics"]["fine_tuned"]["test"]["accuracy"])
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1

    # the loss is the per-example mean, as in one process (transformers 5.x would scale it by the
    # number of processes for models that take loss kwargs)
    utils.set_seed(0)
    model, tokenizer = exercise_2.load_sequence_classifier(tiny_distilbert, results["label_names"])
    test = data.load_text_dataset(str(dataset), "sentence", "topic", seed=0, max_train_samples=96)["test"]
    assert [(row["input"], row["label"]) for row in rows] == \
        [(text, results["label_names"][label]) for text, label in zip(test["text"], test["label"])]
    batch = tokenizer(list(test["text"]), truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        loss = model.eval()(**batch, labels=torch.tensor(list(test["label"]))).loss.item()
    assert results["metrics"]["pretrained"]["test"]["loss"] == pytest.approx(loss, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Real model, real data
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_fine_tuning_beats_its_pretrained_stage(minilm_path, rt_dir, tmp_path):
    run_dir = exercise_2.main([f"model_name={minilm_path}", f"dataset={rt_dir}", f"output_dir={tmp_path}",
                               "max_train_samples=2000", "max_eval_samples=300", "num_train_epochs=1",
                               "learning_rate=5e-5", "wandb_mode=disabled", "tensorboard=false"])
    metrics = read_results(run_dir)["metrics"]
    for split in ("validation", "test"):
        before, after = metrics["pretrained"][split]["accuracy"], metrics["fine_tuned"][split]["accuracy"]
        assert after >= 0.65 and after >= before + 0.10, (split, before, after)
