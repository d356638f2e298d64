"""Exercise 3 end to end on a tiny random-weight CLIP: a smoke run with both loggers and every
output, refusals (a text-only model, bad config), unreadable images skipped and counted or fatal,
interruption and resume, the NaN guard, and (slow) the learning check on 10 real Tiny ImageNet classes."""
from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from tools import build_tiny_clip
import clip
import evaluate
import exercise_3
import utils
from conftest import PoisonAtStep, read_results, SignalAtStep, torchrun_two_processes
from test_clip import image_folder, write_truncated_jpeg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    return build_tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer_dir=str(clip_tokenizer_dir))


def tiny_args(model, dataset, output_dir, **overrides) -> list[str]:
    """A few seconds: 4 classes, 32 training images, 16 validation images, 4 steps of 8."""
    config = {"model_name": model, "dataset": dataset, "output_dir": output_dir, "max_classes": 4,
              "max_train_samples": 32, "max_eval_samples": 16, "batch_size": 8, "eval_batch_size": 16,
              "max_steps": 4, "learning_rate": 1e-2, "warmup": 0, "logging_steps": 2, "save_steps": 100,
              "num_sample_images": 4, "wandb_mode": "disabled", "tensorboard": False, "seed": 0}
    config.update(overrides)
    return [f"{key}={value}" for key, value in config.items()]


def test_smoke_main_writes_both_stages_logs_and_plots(tiny_clip_dir, tiny_imagenet_dir, tmp_path):
    run_dir = exercise_3.main(tiny_args(tiny_clip_dir, tiny_imagenet_dir, tmp_path, run_name="smoke",
                                        eval_strategy="steps", eval_steps=2, tensorboard=True,
                                        wandb_mode="offline", prompts="ensemble"))
    results = read_results(run_dir)
    # 8 train images a class, 2 carved to choose C: 8 and 16 are the "all" probe; then the three scales
    probes = ["linear_probe_1shot", "linear_probe_2shot", "linear_probe_4shot", "linear_probe_all"]
    assert list(results["metrics"]) == ["zero_shot", *probes, "lora", "lora_scale_0", "lora_scale_0.5", "lora_scale_1"]
    for stage in results["metrics"]:
        values = results["metrics"][stage]["validation"]
        for name in ("accuracy", "top5_accuracy", "precision_macro", "recall_macro", "f1_macro",
                     "mean_per_class_recall"):
            assert 0 <= values[name] <= 1, (stage, name)
    model = results["model"]
    # r=8 on q_proj and v_proj of 2 layers in each tower of width 64: 2 * 2 * 2 * (64 * 8 + 8 * 64)
    assert model["trainable_parameters"] == 8192
    assert model["parameters"] == model["base_parameters"] + 8192
    assert {"load_data", "load_model", "zero_shot", "train", "evaluate", "total"} <= set(results["timing"])
    assert [entry["step"] for entry in results["log_history"] if "eval_accuracy" in entry] == [2, 4]
    assert results["skipped_images"]["count"] == 0 and results["images_per_second"]["zero_shot"] > 0
    assert len(results["prompts"]) == len(clip.TEMPLATES["ensemble"])
    for name in ("per_class_accuracy_change.png", "sample_predictions.png", "training_curves.png", "few_shot.png",
                 "interpolation.png", "confusion_lora_validation.png", "adapter/adapter_model.safetensors",
                 *(f"predictions/{stage}_validation.csv" for stage in results["metrics"])):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").glob("offline-run-*"))           # W&B offline, inside the run folder


def test_text_only_model_offline_hub_ids_and_bad_config_are_refused(tmp_path, tiny_clip_dir, tiny_imagenet_dir):
    from transformers import DistilBertConfig

    text_model = tmp_path / "distilbert"
    DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2).save_pretrained(text_model)
    output = tmp_path / "runs"
    with pytest.raises(utils.LabError, match="distilbert model; exercise 3 needs a CLIP"):
        exercise_3.main(tiny_args(text_model, tiny_imagenet_dir, output))
    assert not output.exists()                                         # refused before any run folder
    with pytest.raises(utils.LabError, match="cannot fetch model 'openai/clip-vit-base-patch16'"):
        exercise_3.main(tiny_args("openai/clip-vit-base-patch16", tiny_imagenet_dir, output))
    with pytest.raises(utils.LabError, match="cannot fetch dataset 'zh-plus/tiny-imagenet'.*tiny-imagenet-200"):
        exercise_3.main(tiny_args(tiny_clip_dir, "zh-plus/tiny-imagenet", output))
    for bad, message in (("lora.target_modules=neck", "lora.target_modules"), ("train_template=a photo", "train_template"),
                         ("loss=triplet", "loss"), ("max_classes=0", "max_classes"),
                         ("resume=True", "run_name")):
        with pytest.raises(utils.LabError, match=message):
            exercise_3.main([*tiny_args(tiny_clip_dir, tiny_imagenet_dir, output), bad])


def test_resume_with_changed_training_settings_is_refused(tmp_path):
    """Checked against <run>/run_config.json before any data or model is loaded."""
    args = [f"output_dir={tmp_path}", "run_name=r", "dataset=/no/such/data"]
    (tmp_path / "r").mkdir()
    recorded = utils.parse_config(exercise_3.CONFIG, args)
    (tmp_path / "r" / "run_config.json").write_text(__import__("json").dumps(recorded))
    with pytest.raises(utils.LabError) as error:
        exercise_3.main([*args, "resume=True", "loss=class", "lora.target_modules=q_proj", "max_classes=10",
                         "num_sample_images=4", "eval_batch_size=8"])
    message = str(error.value)
    assert "loss 'clip' -> 'class'" in message and "lora.target_modules ['q_proj', 'v_proj'] -> ['q_proj']" in message
    assert "max_classes None -> 10" in message and "resume_changes=True" in message
    assert "num_sample_images" not in message and "eval_batch_size" not in message  # output only
    with pytest.raises(utils.LabError, match="does not exist"):  # allowed: on to loading the data
        exercise_3.main([*args, "resume=True", "loss=class", "resume_changes=True"])


def test_unreadable_images_are_skipped_and_counted_or_fatal(tmp_path, tiny_clip_dir, capsys):
    splits = image_folder(tmp_path / "images", per_class=4)
    bad_train = write_truncated_jpeg(splits / "train" / "zebra" / "cut.jpg")
    bad_val = write_truncated_jpeg(splits / "val" / "tabby_cat" / "cut.jpg")
    args = tiny_args(tiny_clip_dir, splits, tmp_path / "runs", max_train_samples=None, max_eval_samples=None,
                     batch_size=13, max_steps=2)                       # 13 training images: each step sees all
    run_dir = exercise_3.main(args)
    results = read_results(run_dir)
    assert results["skipped_images"] == {"count": 2, "files": sorted([str(bad_train), str(bad_val)]), "policy": "skip"}
    assert results["data_sizes"] == {"train": 13, "validation": 7}
    assert sum(sum(row) for row in evaluate.read_confusion_matrices(run_dir)["lora"]) == 6    # the readable ones
    assert sum(sum(row) for row in evaluate.read_confusion_matrices(run_dir)["linear_probe_all"]) == 6
    probe = results["linear_probe"]["linear_probe_all"]
    assert probe["train_images"] + probe["carved_images"] == 12          # the probe leaves the cut image out too
    assert "2 unreadable images were skipped" in capsys.readouterr().err
    with pytest.raises(utils.LabError, match="cut.jpg"):
        exercise_3.main([*args, "bad_images=fail"])


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tiny_clip_dir, tiny_imagenet_dir, tmp_path):
    args = tiny_args(tiny_clip_dir, tiny_imagenet_dir, tmp_path, max_steps=6)
    full = exercise_3.main([*args, "run_name=full"])
    with pytest.raises(SystemExit) as stopped:
        exercise_3.main([*args, "run_name=cut"], callbacks=[SignalAtStep(3, signal.SIGTERM)])
    assert stopped.value.code == 128 + signal.SIGTERM
    cut = tmp_path / "cut"
    assert (cut / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").exists()
    assert not (cut / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL          # handler restored
    resumed = exercise_3.main([*args, "run_name=cut", "resume=True"])
    assert resumed == cut and read_results(cut)["training"]["resumed_from"].endswith("checkpoint-3")
    assert read_results(cut)["metrics"] == read_results(full)["metrics"]
    ours, reference = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (cut, full))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[name], reference[name]) for name in ours)


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tiny_clip_dir, tiny_imagenet_dir, tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        exercise_3.main(tiny_args(tiny_clip_dir, tiny_imagenet_dir, tmp_path, run_name="ctrl-c"),
                        callbacks=[SignalAtStep(2, signal.SIGINT)])
    assert stopped.value.code == 128 + signal.SIGINT
    assert [path.name for path in (tmp_path / "ctrl-c" / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGINT) == previous


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_clip_dir, tiny_imagenet_dir, tmp_path):
    args = tiny_args(tiny_clip_dir, tiny_imagenet_dir, tmp_path, run_name="poisoned", max_steps=6, save_steps=2)
    handlers = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(utils.LabError, match=r"NaN or infinite at step 4 \(nan\).*checkpoint-2"):
        exercise_3.main(args, callbacks=[PoisonAtStep(
            3, lambda model: clip.clip_core(model).text_model.embeddings.token_embedding.weight)])
    assert [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)] == handlers
    checkpoints = sorted(path.name for path in (tmp_path / "poisoned" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_gather_features_and_write_one_result(tiny_clip_dir, tiny_imagenet_dir, tmp_path):
    """DDP over gloo: the clip loss gathers both processes' features; each process scores half of the
    validation images, and the joined result is the single-process one; only the main process writes."""
    output_dir = tmp_path / "runs"
    args = tiny_args(tiny_clip_dir, tiny_imagenet_dir, output_dir, eval_batch_size=4)
    results, run_dir = torchrun_two_processes("exercise_3.py", args + ["wandb_mode=offline", "tensorboard=True"],
                                              output_dir)
    assert results["training"]["processes"] == 2 and results["training"]["global_step"] == 4
    for stage in ("zero_shot", "lora"):
        assert sum(map(sum, evaluate.read_confusion_matrices(run_dir)[stage])) == 16    # each image once
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    # the same batches of 4 in one process: the untrained model's predictions row by row
    alone = exercise_3.main(tiny_args(tiny_clip_dir, tiny_imagenet_dir, tmp_path / "alone", eval_batch_size=4))
    joined, single = (evaluate.read_predictions(folder / evaluate.PREDICTIONS_DIR / "zero_shot_validation.csv")
                      for folder in (run_dir, alone))
    assert [row["id"] for row in joined] == list(range(16))
    assert [{**row, "score": None} for row in joined] == [{**row, "score": None} for row in single]
    assert [row["score"] for row in joined] == pytest.approx([row["score"] for row in single], rel=1e-4)
    # the probe's features computed in two shares: the same probe, the same predictions
    joined, single = (evaluate.read_predictions(folder / evaluate.PREDICTIONS_DIR / "linear_probe_all_validation.csv")
                      for folder in (run_dir, alone))
    assert [{**row, "score": None} for row in joined] == [{**row, "score": None} for row in single]
    assert [row["score"] for row in joined] == pytest.approx([row["score"] for row in single], rel=1e-3)


@pytest.mark.slow
def test_learning_check_lifts_accuracy_to_three_times_chance(tmp_path, clip_tokenizer_dir, tiny_imagenet_dir):
    """The small random-weight CLIP, LoRA (r=16 on q_proj and v_proj of both towers) plus both
    projection layers, the in-batch CLIP loss, 600 steps of 32 on 10 classes x 50 real images."""
    model = build_tiny_clip.build_tiny_clip(tmp_path / "tiny-clip-p4", tokenizer_dir=str(clip_tokenizer_dir), patch_size=4)
    run_dir = exercise_3.main(tiny_args(
        model, tiny_imagenet_dir, tmp_path, run_name="learn", max_classes=10, max_train_samples=None,
        max_eval_samples=None, batch_size=32, eval_batch_size=100, max_steps=600, learning_rate=3e-3, warmup=20,
        logging_steps=50, save_steps=1000, **{"lora.r": 16, "lora.alpha": 32,
                                              "lora.modules_to_save": "visual_projection,text_projection"}))
    results = read_results(run_dir)
    before = results["metrics"]["zero_shot"]["validation"]["accuracy"]
    after = results["metrics"]["lora"]["validation"]["accuracy"]
    print(f"learning check: validation accuracy {before:.3f} -> {after:.3f} (chance 0.100), "
          f"trainable {results['model']['trainable_parameters']:,} of {results['model']['parameters']:,}")
    assert results["data_sizes"] == {"train": 500, "validation": 500}
    assert after >= 0.30 and after > before


def test_results_file_stays_small_for_200_classes(tiny_clip_dir, tiny_imagenet_dir, tmp_path):
    """All of Tiny ImageNet's classes: the confusion matrices (2 x 40,000 cells) go beside results.json."""
    run_dir = exercise_3.main(tiny_args(tiny_clip_dir, tiny_imagenet_dir, tmp_path, max_classes=None,
                                        max_train_samples=200, max_eval_samples=400, max_steps=1, eval_batch_size=200))
    assert (run_dir / "results.json").stat().st_size < 100_000
    matrices = evaluate.read_confusion_matrices(run_dir)
    assert {stage: len(matrix) for stage, matrix in matrices.items()} == {stage: 200 for stage in read_results(run_dir)["metrics"]}
    assert len(matrices) == 6         # zero-shot, the "all" probe (one image a class: no k below it), lora, 3 scales
    assert read_results(run_dir)["confusion_matrices"] == evaluate.CONFUSION_FILE
