"""Each exercise and predict.py in bf16 on the CPU, on tiny models: the dtype paths a GPU run takes (autocast in
extraction, training and every evaluation), a few steps each. bf16 is slow on a CPU, so the runs are small."""
from __future__ import annotations

import pytest

import data
import exercise_1
import exercise_2
import exercise_3
import predict
from conftest import read_results
from test_exercise_2 import tiny_args as tiny_args_2
from test_exercise_3 import tiny_args as tiny_args_3
from test_predict import assert_agree, check_predictions_files
from tools import build_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    return build_tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer_dir=str(clip_tokenizer_dir))


def test_exercise_1_extracts_in_bf16_and_predict_replays_it(tmp_path, tiny_distilbert, rt_dir, capsys):
    args = [f"model_name={tiny_distilbert}", f"dataset={rt_dir}", "max_train_samples=80", "max_eval_samples=24",
            "wandb_mode=disabled", "tensorboard=false", "pooling=mean"]
    fp32 = exercise_1.main([*args, f"output_dir={tmp_path / 'fp32'}"])
    bf16 = exercise_1.main([*args, f"output_dir={tmp_path / 'bf16'}", "mixed_precision=bf16"])
    assert "far slower than fp32" in capsys.readouterr().err
    assert read_results(bf16)["model"]["precision"] == "bf16" and read_results(fp32)["model"]["precision"] == "no"
    dataset = data.load_text_dataset(str(rt_dir), seed=42, max_train_samples=80, max_eval_samples=24)
    files, reference = check_predictions_files(bf16, dataset), check_predictions_files(fp32, dataset)
    # bf16 features are not fp32's: the scores move (and the cache keeps the two apart)
    assert [row["score"] for row in files["logreg", "test"]] != \
        pytest.approx([row["score"] for row in reference["logreg", "test"]], abs=1e-4)
    theirs = files["logreg", "test"][:6]
    assert_agree(predict.main([str(bf16), *(row["input"] for row in theirs), "--stage", "logreg"]), theirs)


def test_exercise_2_trains_and_evaluates_in_bf16(tmp_path, tiny_distilbert, rt_dir):
    run_dir = exercise_2.main(tiny_args_2(tiny_distilbert, rt_dir, tmp_path, max_steps=4, eval_steps=2,
                                          mixed_precision="bf16"))
    results = read_results(run_dir)
    assert results["training"]["global_step"] == 4
    files = check_predictions_files(run_dir, data.load_text_dataset(str(rt_dir), seed=0, max_train_samples=96,
                                                                    max_eval_samples=32))
    theirs = files["fine_tuned", "test"][:6]
    # the run evaluated under bf16 autocast; predict replays it (bf16 rounding: scores to ~1e-2)
    assert_agree(predict.main([str(run_dir), *(row["input"] for row in theirs)]), theirs, score_abs=1e-2)


def test_exercise_3_trains_and_evaluates_in_bf16(tmp_path, tiny_clip_dir, tiny_imagenet_dir):
    import images

    run_dir = exercise_3.main(tiny_args_3(tiny_clip_dir, tiny_imagenet_dir, tmp_path, mixed_precision="bf16",
                                          eval_strategy="steps", eval_steps=2, **{"lora.learning_rate": 1e-2}))
    results = read_results(run_dir)
    assert results["training"]["precision"] == "bf16" and results["training"]["global_step"] == 4
    assert [entry["step"] for entry in results["log_history"] if "eval_accuracy" in entry] == [2, 4]
    dataset = images.load_image_dataset(str(tiny_imagenet_dir), seed=0, max_train_samples=32, max_eval_samples=16,
                                        max_classes=4)
    theirs = check_predictions_files(run_dir, dataset)["lora", "validation"][:6]
    assert_agree(predict.main([str(run_dir), *(row["input"] for row in theirs)]), theirs, top5=True, score_abs=1e-2)
