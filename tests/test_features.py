"""Pooling and batched feature extraction against a naive one-sentence-at-a-time reference; the cache."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cache
import exercise_1
import data
import hub


def test_pool_shapes_and_mask_aware_mean():
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert exercise_1.pool(hidden, mask, "cls").shape == (2, 4)
    assert torch.equal(exercise_1.pool(hidden, mask, "cls"), hidden[:, 0])
    mean = exercise_1.pool(hidden, mask, "mean")
    assert mean.shape == (2, 4)
    assert torch.allclose(mean[0], hidden[0, :2].mean(0)), "padding must not enter the mean"
    assert torch.allclose(mean[1], hidden[1].mean(0))
    with pytest.raises(ValueError):
        exercise_1.pool(hidden, mask, "max")


def naive_features(model, tokenizer, texts, pooling, max_length):
    """The course's way: one sentence at a time, no padding at all."""
    rows = []
    with torch.no_grad():
        for text in texts:
            encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**{k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask")}).last_hidden_state
            rows.append(hidden[0, 0] if pooling == "cls" else hidden[0].mean(0))
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_batched_extraction_equals_naive_reference(tiny_distilbert, rt_dir, pooling):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_distilbert).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_distilbert)
    assert "[UNK]" not in tokenizer.tokenize("the film is a great zzzz"), "fixture vocab must be real"
    texts = data.load_rt_polarity(rt_dir)["splits"]["test"]["text"][:37]
    texts[3] = "short"
    texts[5] = " ".join(["long"] * 300)  # truncated at max_length
    batched = exercise_1.extract_features(model, tokenizer, texts, pooling, max_length=64, batch_size=8)
    reference = naive_features(model, tokenizer, texts, pooling, max_length=64)
    assert batched.shape == (37, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_fast_path_gives_the_plain_loops_features(tiny_distilbert, rt_dir, pooling):
    """extract_features (length-sorted batches on worker threads) computes embed_texts's features, the lesson's
    loop over batches in the texts' order; both pad after the text, also with a tokenizer that pads before it."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_distilbert).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_distilbert)
    texts = data.load_rt_polarity(rt_dir)["splits"]["validation"]["text"][:21] + ["short", " ".join(["long"] * 300)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = exercise_1.extract_features(model, tokenizer, texts, pooling, max_length=64, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    plain = exercise_1.embed_texts(model, tokenizer, texts, pooling, max_length=64, batch_size=8)
    assert plain.shape == fast.shape == (23, 32) and plain.dtype == fast.dtype == np.float32
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=1e-5)
    tokenizer.padding_side = "left"
    left = exercise_1.embed_texts(model, tokenizer, texts, pooling, max_length=64, batch_size=8)
    np.testing.assert_allclose(left, plain, atol=1e-5, rtol=1e-5)


def test_the_token_batches_reach_a_gpu_through_pinned_memory(tiny_distilbert):
    """On CUDA each tokenized batch is copied from page-locked memory (devices.to_device). Without a GPU, torch's
    own pin_memory refuses, which shows the path goes through it."""
    from transformers import AutoModel, AutoTokenizer

    if torch.cuda.is_available():
        pytest.skip("with a GPU the copy succeeds; tools/gpu_check.py runs the extraction there")
    model, tokenizer = AutoModel.from_pretrained(tiny_distilbert).eval(), AutoTokenizer.from_pretrained(tiny_distilbert)
    with pytest.raises(RuntimeError, match="accelerator"):
        exercise_1.embed_texts(model, tokenizer, ["a fine film"], device="cuda")


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_token(tiny_distilbert, tmp_path):
    """GPT-style tokenizers have no pad token: load_encoder pads with the end-of-text token, which the attention
    mask hides, so the features are those of the same model padding with [PAD]."""
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path / "no-pad-token"
    AutoModel.from_pretrained(tiny_distilbert).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_distilbert)
    tokenizer.pad_token, tokenizer.eos_token = None, "[SEP]"
    tokenizer.save_pretrained(folder)
    model, loaded = exercise_1.load_encoder(str(folder))
    texts = ["a fine film", "a long and rather dull film about nothing much at all", "short"]
    padded = exercise_1.embed_texts(model, loaded, texts, "mean", batch_size=3)
    np.testing.assert_allclose(padded, exercise_1.embed_texts(model, AutoTokenizer.from_pretrained(tiny_distilbert),
                                                              texts, "mean", batch_size=3), atol=1e-5)


def test_cache_hit_and_miss(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    key = {"model": "m", "texts": "abc", "pooling": "cls"}
    first, hit_first = cache.cached_array(tmp_path, key, compute)
    second, hit_second = cache.cached_array(tmp_path, dict(key), compute)
    assert (hit_first, hit_second) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(first, second)
    _, hit_other = cache.cached_array(tmp_path, {**key, "pooling": "mean"}, compute)
    assert not hit_other and len(calls) == 2
    assert all(path.suffix == ".safetensors" for path in tmp_path.iterdir())


def test_fingerprints_change_with_their_inputs(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = cache.model_fingerprint(str(folder))
    (folder / "model.safetensors").write_bytes(b"weights")
    assert cache.model_fingerprint(str(folder)) != before
    assert cache.texts_fingerprint(["a", "b"]) != cache.texts_fingerprint(["ab"])


# ---------------------------------------------------------------------------------------------
# The cache heals: a damaged entry is removed and computed again; a write is never seen half done
# ---------------------------------------------------------------------------------------------

FEATURES = np.arange(12, dtype=np.float32).reshape(4, 3)
KEY = {"model": "m", "texts": "abc", "pooling": "cls"}


def counting_compute(calls):
    def compute():
        calls.append(1)
        return FEATURES.copy()
    return compute


def entry(folder):
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors", files  # no temporary file left behind
    return files[0]


def overwrite_with_other_array(path, array, name="features"):
    from safetensors.numpy import save_file

    save_file({name: array}, str(path), metadata={"key": json.dumps(KEY, sort_keys=True)})


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]), "SafetensorError"),
    (lambda path: path.write_bytes(b"\x00garbage" * 50), "SafetensorError"),
    (lambda path: path.write_bytes(b""), "SafetensorError"),
    (lambda path: overwrite_with_other_array(path, FEATURES[:3]), "3 rows, not 4"),
    (lambda path: overwrite_with_other_array(path, FEATURES.astype(np.float64)), "dtype float64, not float32"),
    (lambda path: overwrite_with_other_array(path, FEATURES, name="other"), "SafetensorError"),
])
def test_a_damaged_cache_entry_is_removed_and_recomputed(tmp_path, capsys, damage, reason):
    calls = []
    compute = counting_compute(calls)
    cache.cached_array(tmp_path, KEY, compute, rows=4, dtype=np.float32)
    path = entry(tmp_path)
    damage(path)
    array, hit = cache.cached_array(tmp_path, KEY, compute, rows=4, dtype=np.float32)
    assert not hit and len(calls) == 2
    np.testing.assert_array_equal(array, FEATURES)
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and warning.startswith(f"warning: cache file {path} is unusable") and reason in warning
    again, hit = cache.cached_array(tmp_path, KEY, compute, rows=4, dtype=np.float32)
    assert hit and len(calls) == 2 and entry(tmp_path) == path, "the recomputed entry is used next time"
    np.testing.assert_array_equal(again, FEATURES)


def test_an_entry_of_another_key_is_not_used(tmp_path, capsys):
    calls = []
    cache.cached_array(tmp_path, KEY, counting_compute(calls))
    path = entry(tmp_path)
    from safetensors.numpy import save_file

    save_file({"features": FEATURES * 2}, str(path), metadata={"key": "{}"})
    array, hit = cache.cached_array(tmp_path, KEY, counting_compute(calls))
    assert not hit and len(calls) == 2 and "another key" in capsys.readouterr().err
    np.testing.assert_array_equal(array, FEATURES)


def test_cache_writes_are_atomic_and_private_to_each_writer(tmp_path, monkeypatch):
    """Each writer has a temporary file of its own in the cache folder, renamed over the entry in one step:
    eight writers at once all succeed, and a reader sees a whole entry or none."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    replaced, real_replace = [], os.replace

    def watch_replace(source, target):
        source, target = Path(source), Path(target)
        assert source.parent == target.parent and str(os.getpid()) in source.name
        replaced.append(source.name)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", watch_replace)

    def slow_compute():
        time.sleep(0.05)
        return FEATURES.copy()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.cached_array(tmp_path, KEY, slow_compute, rows=4)[0], range(8)))
    assert all(np.array_equal(result, FEATURES) for result in results)
    assert len(replaced) == len(set(replaced)) >= 1
    array, hit = cache.cached_array(tmp_path, KEY, slow_compute, rows=4, dtype=np.float32)
    assert hit and np.array_equal(array, FEATURES) and entry(tmp_path)


def test_temporary_files_of_killed_runs_are_cleaned_up(tmp_path):
    import os

    stale, fresh = tmp_path / ".features-x.safetensors.1-aa.tmp", tmp_path / ".features-y.safetensors.2-bb.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"half")
    os.utime(stale, (time.time() - 2 * cache.STALE_SECONDS,) * 2)
    cache.cached_array(tmp_path, KEY, lambda: FEATURES)
    assert not stale.exists() and fresh.exists(), "a fresh one may be another run's write in progress"


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """A full disk: the computed array is returned (the cache only saves time), with one warning, and nothing is
    left in the folder; tests/test_write_faults.py runs exercise 1 on a really full cache disk."""
    import os

    def no_space(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    array, hit = cache.cached_array(tmp_path, KEY, lambda: FEATURES)
    assert array is FEATURES and not hit and not list(tmp_path.iterdir())
    assert "going on without caching features" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# max_length is capped at the model's limit, through one helper for exercises 1 and 2
# ---------------------------------------------------------------------------------------------

def test_max_length_is_capped_at_the_models_limit(tiny_distilbert, capsys):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_distilbert)
    config = AutoConfig.from_pretrained(tiny_distilbert)
    assert tokenizer.model_max_length > 10 ** 9, "the fixture's tokenizer has no limit of its own"
    assert hub.usable_max_length(128, tokenizer, config) == 128 and not capsys.readouterr().err
    assert hub.usable_max_length(100000, tokenizer, config) == 256
    assert "max_length=100000" in capsys.readouterr().err
    tokenizer.model_max_length = 64
    assert hub.usable_max_length(100000, tokenizer, config) == hub.usable_max_length(100000, tokenizer) == 64


def test_extreme_max_length_in_both_text_exercises(tiny_distilbert, rt_dir):
    import exercise_2
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_distilbert).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_distilbert)
    texts = ["a fine film", " ".join(["long"] * 600)]
    max_length = hub.usable_max_length(100000, tokenizer, model.config)      # as exercise_1.main caps it
    assert max_length == 256
    capped = exercise_1.extract_features(model, tokenizer, texts, "mean", max_length=max_length, batch_size=2)
    np.testing.assert_allclose(capped, exercise_1.extract_features(model, tokenizer, texts, "mean", max_length=256),
                               atol=1e-6)
    splits = data.load_text_dataset(str(rt_dir), seed=0, max_train_samples=20, max_eval_samples=10)
    splits["train"] = splits["train"].map(lambda row, i: {"text": texts[1]} if i == 0 else row, with_indices=True)
    tokenized = exercise_2.tokenize(splits, tokenizer, 100000, model.config)
    assert max(len(ids) for ids in tokenized["train"]["input_ids"]) == 256
