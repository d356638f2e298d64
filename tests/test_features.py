"""Pooling and batched feature extraction against a naive one-sentence-at-a-time reference; the cache."""
import numpy as np
import pytest
import torch

import exercise_1
import data
import utils


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


def test_pad_batch():
    input_ids, mask = exercise_1.pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


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


def test_cache_hit_and_miss(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    key = {"model": "m", "texts": "abc", "pooling": "cls"}
    first, hit_first = utils.cached_array(tmp_path, key, compute)
    second, hit_second = utils.cached_array(tmp_path, dict(key), compute)
    assert (hit_first, hit_second) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(first, second)
    _, hit_other = utils.cached_array(tmp_path, {**key, "pooling": "mean"}, compute)
    assert not hit_other and len(calls) == 2
    assert all(path.suffix == ".safetensors" for path in tmp_path.iterdir())


def test_fingerprints_change_with_their_inputs(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = utils.model_fingerprint(str(folder))
    (folder / "model.safetensors").write_bytes(b"weights")
    assert utils.model_fingerprint(str(folder)) != before
    assert utils.texts_fingerprint(["a", "b"]) != utils.texts_fingerprint(["ab"])
