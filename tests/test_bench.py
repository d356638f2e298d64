"""Bench scripts: FLOP counting against torch's counter, and a smoke run of each script on a tiny
model (the JSON line is complete and the two sides agree; no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import exercise_1
from bench import common
from conftest import ROOT


def run_bench(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", f"bench.{script.removesuffix('.py')}", "--smoke", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == script.removesuffix(".py") and "met" in result and result["machine"]["cores"] >= 1
    return result


@pytest.mark.parametrize("with_head", [False, True])
def test_forward_flops_match_torch_flop_counter(with_head):
    """Our formula (linear layers + attention, pooler/classifier once per sequence) equals what
    torch.utils.flop_counter counts for unpadded single-sequence forwards. Eager attention: the
    counter does not know CPU's fused attention kernel, but the FLOPs are the same."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    config._attn_implementation = "eager"
    model = (BertForSequenceClassification if with_head else BertModel)(config).eval()
    lengths = [5, 17, 40]
    counted = 0
    with torch.inference_mode():
        for length in lengths:
            with FlopCounterMode(display=False) as counter:
                model(input_ids=torch.randint(0, 100, (1, length)))
            counted += counter.get_total_flops()
    assert common.forward_flops(model, lengths) == counted


def test_features_smoke(tiny_distilbert):
    result = run_bench("features.py", "--model", tiny_distilbert, "--profile")
    assert result["same_features"] is True and result["sentences"] == 32 and len(result["per_round"]) == 1
    assert result["extractor_sentences_per_s"] > 0 and result["pipeline_sentences_per_s"] > 0
    assert 0 < result["efficiency"] and result["tokens"] > result["sentences"]
    assert result["efficiency_spread"] == [result["efficiency"]] * 2
    shares = {key: value for key, value in result["profile"].items() if key != "wall_s"}
    assert set(shares) == {"matmul", "attention", "layer_norm", "gelu", "softmax", "other_ops", "tokenize",
                           "python_and_dispatch"}
    assert result["profile"]["wall_s"] > 0 and shares["matmul"] > 0 and 0.95 <= sum(shares.values()) <= 1.05
    # sentence-transformers' encode on the same sentences (the tiny DistilBERT loads with mean pooling)
    peer = result["peer"]
    assert peer["library"].startswith("sentence-transformers") and peer["rounds"] == 1 and peer["batch_size"] == 32
    assert result["peer_cosine_min"] == peer["cosine_min"] > 0.999 and result["peer_speed_ratio"] > 0
    assert result["targets"]["peer_speed_ratio"] == 1.0 and result["ratios"][-2:] == ["peer_speed_ratio", "peer_cosine_min"]


def test_finetune_smoke(tiny_distilbert):
    result = run_bench("finetune.py", "--model", tiny_distilbert)
    assert result["timed_steps"] == 2 and result["dynamic_samples_per_s"] > 0 and result["max_length_samples_per_s"] > 0
    assert result["rounds"] == len(result["per_round"]) == 1
    assert 0 < result["real_tokens_per_sample"] < 256 and result["efficiency"] > 0
    assert result["efficiency_spread"] == [result["efficiency"]] * 2 and result["targets"]["efficiency"] == 0.55


def test_finetune_batches_are_the_exercise_samplers_and_span_its_lengths():
    """bench/finetune.py times batches exactly as exercise 2's length-grouped sampler forms them on the
    whole training split, picked across the range of widths: their mean length is the epoch's."""
    import numpy as np
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from bench import finetune

    lengths = list(np.random.default_rng(0).integers(5, 80, size=1600))
    order = list(LengthGroupedSampler(16, lengths=lengths, generator=torch.Generator().manual_seed(42)))
    epoch = [order[i:i + 16] for i in range(0, len(order), 16)]
    picked = finetune.exercise_batches(lengths, 16, 10, seed=42)
    assert len(picked) == 10 and all(batch in epoch for batch in picked)
    assert [epoch.index(batch) for batch in picked] == sorted(epoch.index(batch) for batch in picked)
    widths = sorted(max(lengths[i] for i in batch) for batch in epoch)
    picked_widths = [max(lengths[i] for i in batch) for batch in picked]
    assert min(picked_widths) <= widths[len(widths) // 10] and max(picked_widths) >= widths[-len(widths) // 10]
    assert abs(np.mean([lengths[i] for b in picked for i in b]) - np.mean(lengths)) < 0.1 * np.mean(lengths)


def test_int8_smoke(tiny_distilbert):
    """Both sides run over every split of the (subsampled) data and fit both classifiers; no timing is asserted."""
    result = run_bench("int8.py", "--model", tiny_distilbert)
    assert result["splits"] == {"train": 64, "validation": 32, "test": 32} and result["sentences"] == 128
    assert result["int8_speedup"] > 0 and result["rounds"] == len(result["per_round"]) == 1
    assert 0 < result["feature_cosine"] <= 1.0001 and result["pooling"] == exercise_1.CONFIG["pooling"]
    for side in ("fp32", "int8"):
        assert set(result["accuracy"][side]) == {"svc", "logreg"}
    drop = max(100 * (result["accuracy"]["fp32"][kind]["test"] - result["accuracy"]["int8"][kind]["test"])
               for kind in ("svc", "logreg"))
    assert result["accuracy_drop_points"] == pytest.approx(drop, abs=0.01)
    assert result["targets"] == {"int8_speedup": 1.5, "accuracy_drop_points": 1.0}


def test_eval_memory_smoke(tiny_distilbert):
    result = run_bench("eval_memory.py", "--model", tiny_distilbert)
    assert (result["n"], result["large_n"]) == (16, 64) and set(result["runs"]) == {"default", "fixed_mmap_threshold"}
    for run in result["runs"].values():
        assert run["small"]["peak_mb"] >= run["small"]["rss_before_mb"] > 0 and run["large"]["n"] == 64


def test_zeroshot_smoke(tiny_imagenet_dir, clip_tokenizer_dir):
    result = run_bench("zeroshot.py", "--dataset", str(tiny_imagenet_dir))
    assert result["same_predictions"] is True and result["classes"] == 200 and result["images"] == 16
    assert result["cached_images_per_s"] > 0 and result["reencode_images_per_s"] > 0 and result["rounds"] == 1
    assert result["ceiling_speedup"] > 1


def test_zeroshot_pipeline_smoke(tiny_imagenet_dir, clip_tokenizer_dir):
    """Both sides classify the same 4 images alike; two batches, so the floor runs with 0, 1 and 2 workers."""
    result = run_bench("zeroshot_pipeline.py", "--dataset", str(tiny_imagenet_dir), "--batch-size", "2")
    assert result["agreement"] == 1.0 and result["disagreements"] == 0 and result["classes"] == 200
    assert result["images"] == result["floor_images"] == 4 and result["template"] == "a photo of a {}."
    assert result["exercise_images_per_s"] > 0 and result["pipeline_images_per_s"] > 0 and result["pipeline_speedup"] > 0
    assert result["pipeline_speedup_whole_split"] > 0
    assert set(result["floor_by_workers"]) == {"0", "1", "2"} and result["best_num_workers"] in (0, 1, 2)
    assert result["end_to_end_over_forward"] == result["floor_by_workers"][str(result["best_num_workers"])]["end_to_end_over_forward"]
    assert result["ratios"] == ["pipeline_speedup", "pipeline_speedup_whole_split", "end_to_end_over_forward"] and result["targets"] == {} and result["met"] is None


def test_probe_smoke():
    result = run_bench("probe.py")
    assert result["full"]["train_rows"] == 10 * result["small"]["train_rows"]
    assert set(result["full"]["accuracy"]) == {"linear_probe_1shot", "linear_probe_2shot", "linear_probe_4shot",
                                               "linear_probe_8shot", "linear_probe_16shot", "linear_probe_all"}
    assert result["full"]["accuracy"]["linear_probe_all"] > 0.15       # chance is 0.10: the probes learned
    assert result["seconds_per_row_growth"] > 0


def test_transform_smoke(tiny_imagenet_dir):
    result = run_bench("transform.py", "--dataset", str(tiny_imagenet_dir))
    assert result["within_tolerance"] is True and result["max_abs_difference"] <= result["tolerance"]["max_abs"]
    assert result["stock_images_per_s"] > 0 and result["batched_images_per_s"] > 0 and result["forward_images_per_s"] > 0
    assert set(result["pipeline_images_per_s_by_workers"]) == {"0", "1", "2"} and result["targets"] == {"speedup": 2.0}


def test_scaling_smoke(tiny_distilbert, tiny_imagenet_dir, clip_tokenizer_dir):
    """Every stage at every size, an exponent between consecutive sizes; the largest pair's a ceiling, the exact SVC's
    exempt."""
    from bench import table

    result = run_bench("scaling.py", "--model", tiny_distilbert)
    ex1 = result["exercise_1"]
    assert ex1["sizes"] == [100, 200, 400] and [r["n"] for r in ex1["extraction"]] == [100, 200]
    assert ex1["svc_solvers"] == {"100": "exact", "200": "approximate", "400": "approximate"}  # threshold 150 in smoke
    exponents = [key for key in result["ratios"] if "_exp_" in key]
    assert len(exponents) == 2 + 3 * 2 * 2 + 2 * 2 + 2 + 2 + 2  # ex1 extract, fits, predict; ex2; ex3; loading
    assert set(result["exempt"]) == {f"ex1_svc_{stage}_{what}_exp_100_200" for stage in ("fit", "predict")
                                     for what in ("time", "memory")}
    lower = {f"ex1_logreg_fit_{what}_exp_100_200" for what in ("time", "memory")}  # the goal: each stage's largest pair
    assert set(result["without_goal"]) == lower
    assert set(result["targets"]) == set(result["ceilings"]) == set(exponents) - set(result["exempt"]) - lower
    assert all(isinstance(result[key], float) for key in result["ratios"])
    assert all(goal == "<= 1.1" for _, _, goal, _ in table.rows(result) if goal != "-")
    assert [(r["rows"], r["steps"]) for r in result["exercise_2"]] == [(64, 3), (256, 3)]
    assert [r["n"] for r in result["exercise_3"]] == [8, 16] and result["exercise_3"][0]["images_per_s"] > 0
    assert [(r["rows"], r["splits"]["train"]) for r in result["loading"]] == [(1000, 500), (4000, 500)]
    text = result["megabyte_text"]
    assert text["text_chars"] == int(0.05 * 2 ** 20) and text["text_tokens_kept"] == 128 and text["normal_features_unchanged"]


def test_table_reads_ceilings_from_the_line():
    """A line's "ceilings" make its goals upper bounds (bench.scaling's exponents); other goals stay floors."""
    from bench import table

    line = {"bench": "scaling", "model": "m", "a_exp": 1.3, "b_exp": 0.9, "c": 2.0, "ratios": ["a_exp", "b_exp", "c"],
            "targets": {"a_exp": 1.1, "b_exp": 1.1, "c": 1.5}, "ceilings": ["a_exp", "b_exp"]}
    assert table.rows(line) == [("scaling (m): a_exp", 1.3, "<= 1.1", "no"), ("scaling (m): b_exp", 0.9, "<= 1.1", "yes"),
                                ("scaling (m): c", 2.0, ">= 1.5", "yes")]


def test_table_keeps_the_newest_line_of_each_bench_and_model(tmp_path):
    """bench.table: one row per ratio of the newest line of each (bench, model); ceilings and floors."""
    from bench import table

    lines = [{"bench": "features", "model": "m", "speedup": 2.0, "efficiency": 0.8,
              "targets": {"speedup": 3.0, "efficiency": 0.75}, "time": "old"},
             {"bench": "features", "model": "m", "speedup": 3.5, "efficiency": 0.7,
              "targets": {"speedup": 3.0, "efficiency": 0.75}, "time": "new"},
             {"bench": "zeroshot_pipeline", "model": "tiny", "pipeline_speedup": 30.0, "end_to_end_over_forward": 0.1,
              "ratios": ["pipeline_speedup", "end_to_end_over_forward"], "targets": {}, "time": "t"}]
    (tmp_path / "features.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    (tmp_path / "zeroshot_pipeline.jsonl").write_text(json.dumps(lines[2]) + "\n")
    (tmp_path / "eval_memory.jsonl").write_text(json.dumps({"bench": "eval_memory", "model": "m", "growth_ratio": 0.84,
                                                            "targets": {"growth_ratio": 1.2}, "time": "t"}) + "\n")
    (tmp_path / "int8.jsonl").write_text(json.dumps({"bench": "int8", "model": "m", "int8_speedup": 2.5,
                                                     "accuracy_drop_points": 3.4, "time": "t",
                                                     "targets": {"int8_speedup": 1.5, "accuracy_drop_points": 1.0}}) + "\n")
    rows = [row for result in table.newest_results(tmp_path) for row in table.rows(result)]
    assert rows == [("eval_memory (m): growth_ratio", 0.84, "<= 1.2", "yes"),
                    ("features (m): speedup", 3.5, ">= 3", "yes"), ("features (m): efficiency", 0.7, ">= 0.75", "no"),
                    ("int8 (m): int8_speedup", 2.5, ">= 1.5", "yes"), ("int8 (m): accuracy_drop_points", 3.4, "<= 1", "no"),
                    ("zeroshot_pipeline (tiny): pipeline_speedup", 30.0, "-", "-"),
                    ("zeroshot_pipeline (tiny): end_to_end_over_forward", 0.1, "-", "-")]
    assert table.table(table.newest_results(tmp_path)).count("\n") == 1 + len(rows)


def test_parallel_extraction_restores_threads_and_raises(tiny_distilbert):
    """exercise_1.extract_features runs CPU batches on single-threaded workers (what bench/features.py
    measures): torch's thread count comes back afterwards, also when a batch fails."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_distilbert).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_distilbert)
    texts = [f"a film number {i} " * (1 + i % 7) for i in range(40)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = exercise_1.extract_features(model, tokenizer, texts, "mean", batch_size=4)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        sequential = exercise_1.extract_features(model, tokenizer, texts, "mean", batch_size=4)
        assert (parallel == sequential).all()  # each batch is computed single-threaded either way

        class FailingModel(torch.nn.Module):
            def forward(self, input_ids, attention_mask):
                raise RuntimeError("out of memory")

        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="out of memory"):
            exercise_1.extract_features(FailingModel(), tokenizer, texts, "cls", batch_size=4)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_length_batches():
    lengths = [5, 40, 12, 40, 3, 7, 100, 9]
    batches = exercise_1.length_batches(lengths, batch_size=3)
    assert [list(batch) for batch in batches] == [[6, 3, 1], [2, 7, 5], [0, 4]]  # longest first
    capped = exercise_1.length_batches(lengths, batch_size=3, max_tokens=80)
    assert [list(batch) for batch in capped] == [[6], [3, 1], [2, 7, 5], [0, 4]]
    for batch in capped[1:]:
        assert len(batch) * max(lengths[i] for i in batch) <= 80  # a lone 100-token text still gets a batch
    assert sorted(i for batch in capped for i in batch) == list(range(len(lengths)))
