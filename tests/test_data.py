"""Text data loading: the original rt-polarity files, CSV/JSON/Parquet folders, carving, subsampling."""
from collections import Counter

import pandas as pd
import pytest

import utils
from conftest import write_csv_dataset


def test_rt_polarity_reproduces_the_hub_splits(rt_dir):
    data = utils.load_text_dataset(str(rt_dir))
    assert {split: len(data[split]) for split in data} == {"train": 8530, "validation": 1066, "test": 1066}
    assert data["train"].features["label"].names == ["neg", "pos"]
    for split, n in (("train", 4265), ("validation", 533), ("test", 533)):
        assert Counter(data[split]["label"]) == {0: n, 1: n}
    # file order, positives first; latin-1 keeps the original bytes as code points
    with open(rt_dir / "rt-polarity.pos", encoding="latin-1", newline="\n") as handle:
        first_pos = handle.readline().strip()
    assert data["train"][0] == {"text": first_pos, "label": 1}
    assert data["train"][4265]["label"] == 0
    # 31 lines hold U+0085 (a line break to str.splitlines); strip() trims it at line ends, as the Hub does
    assert sum("\x85" in text for split in data for text in data[split]["text"]) == 22


def test_csv_with_string_labels_and_custom_columns(tmp_path):
    folder = write_csv_dataset(tmp_path / "topics", num_classes=4, per_class=20)
    data = utils.load_text_dataset(str(folder), text_column="sentence", label_column="topic")
    names = data["train"].features["label"].names
    assert names == ["music", "politics", "science", "sports"]
    assert set(data["train"]["label"]) == {0, 1, 2, 3}
    frame = pd.read_csv(folder / "test.csv")
    assert [names[i] for i in list(data["test"]["label"])] == frame["topic"].tolist()


def test_json_lines_and_parquet_and_integer_labels(tmp_path):
    rows = pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": [i % 2 + 1 for i in range(40)]})
    rows.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    rows.to_parquet(tmp_path / "validation.parquet")
    rows.to_csv(tmp_path / "test.csv", index=False)
    data = utils.load_text_dataset(str(tmp_path))
    assert data["train"].features["label"].names == ["1", "2"], "labels 1/2 map to ids 0/1, names kept"
    assert data["validation"]["label"][:2] == [0, 1]


def test_missing_validation_is_carved_stratified_and_seeded(tmp_path):
    folder = write_csv_dataset(tmp_path / "d", num_classes=3, per_class=40, splits=("train", "test"))
    first = utils.load_text_dataset(str(folder), "sentence", "topic", seed=1)
    again = utils.load_text_dataset(str(folder), "sentence", "topic", seed=1)
    assert len(first["train"]) + len(first["validation"]) == 120
    assert Counter(first["validation"]["label"]) == {0: 4, 1: 4, 2: 4}
    assert first["validation"]["text"] == again["validation"]["text"]
    other = utils.load_text_dataset(str(folder), "sentence", "topic", seed=2)
    assert other["validation"]["text"] != first["validation"]["text"]


def test_subsampling_is_stratified_seeded_and_capped(rt_dir, capsys):
    data = utils.load_text_dataset(str(rt_dir), seed=3, max_train_samples=100, max_eval_samples=5000)
    assert Counter(data["train"]["label"]) == {0: 50, 1: 50}
    assert len(data["test"]) == 1066 and "using all 1066" in capsys.readouterr().out
    again = utils.load_text_dataset(str(rt_dir), seed=3, max_train_samples=100)
    assert again["train"]["text"] == data["train"]["text"]


def test_data_errors_are_clear(tmp_path):
    with pytest.raises(utils.LabError, match="does not exist"):
        utils.load_text_dataset(str(tmp_path / "nope" / "data"))
    folder = write_csv_dataset(tmp_path / "d", num_classes=2, per_class=10)
    with pytest.raises(utils.LabError, match="no column 'text'"):
        utils.load_text_dataset(str(folder))
    pd.DataFrame({"sentence": ["a"], "topic": ["unknown-topic"]}).to_csv(folder / "test.csv", index=False)
    with pytest.raises(utils.LabError, match="unknown-topic.*never occur in train"):
        utils.load_text_dataset(str(folder), "sentence", "topic")
    pd.DataFrame({"sentence": [], "topic": []}).to_csv(folder / "test.csv", index=False)
    with pytest.raises(utils.LabError, match="test split .* is empty"):
        utils.load_text_dataset(str(folder), "sentence", "topic")
    (folder / "test.csv").write_bytes("sentence,topic\nclich\xe9s galore,sports\n".encode("latin-1"))
    with pytest.raises(utils.LabError, match="not UTF-8"):
        utils.load_text_dataset(str(folder), "sentence", "topic")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(utils.LabError, match="no train file"):
        utils.load_text_dataset(str(empty))


def test_offline_hub_id_fails_fast_with_the_offline_route(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(utils.LabError, match="'someone/some-model'.*unreachable.*local"):
        utils.resolve_pretrained("someone/some-model", "model")
