"""Text data loading: the original rt-polarity files, CSV/JSON/Parquet folders, carving, subsampling."""
from collections import Counter

import pandas as pd
import pytest

import hub
import data
import utils
from conftest import write_csv_dataset


def test_rt_polarity_reproduces_the_hub_splits(rt_dir):
    splits = data.load_text_dataset(str(rt_dir))
    assert {split: len(splits[split]) for split in splits} == {"train": 8530, "validation": 1066, "test": 1066}
    assert splits["train"].features["label"].names == ["neg", "pos"]
    for split, n in (("train", 4265), ("validation", 533), ("test", 533)):
        assert Counter(splits[split]["label"]) == {0: n, 1: n}
    # file order, positives first; latin-1 keeps the original bytes as code points
    with open(rt_dir / "rt-polarity.pos", encoding="latin-1", newline="\n") as handle:
        first_pos = handle.readline().strip()
    assert splits["train"][0] == {"text": first_pos, "label": 1}
    assert splits["train"][4265]["label"] == 0
    # 31 lines hold U+0085 (a line break to str.splitlines); strip() trims it at line ends, as the Hub does
    assert sum("\x85" in text for split in splits for text in splits[split]["text"]) == 22


def test_csv_with_string_labels_and_custom_columns(tmp_path):
    folder = write_csv_dataset(tmp_path / "topics", num_classes=4, per_class=20)
    splits = data.load_text_dataset(str(folder), text_column="sentence", label_column="topic")
    names = splits["train"].features["label"].names
    assert names == ["music", "politics", "science", "sports"]
    assert set(splits["train"]["label"]) == {0, 1, 2, 3}
    frame = pd.read_csv(folder / "test.csv")
    assert [names[i] for i in list(splits["test"]["label"])] == frame["topic"].tolist()


def test_json_lines_and_parquet_and_integer_labels(tmp_path):
    rows = pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": [i % 2 + 1 for i in range(40)]})
    rows.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    rows.to_parquet(tmp_path / "validation.parquet")
    rows.to_csv(tmp_path / "test.csv", index=False)
    splits = data.load_text_dataset(str(tmp_path))
    assert splits["train"].features["label"].names == ["1", "2"], "labels 1/2 map to ids 0/1, names kept"
    assert splits["validation"]["label"][:2] == [0, 1]


def test_missing_validation_is_carved_stratified_and_seeded(tmp_path):
    folder = write_csv_dataset(tmp_path / "d", num_classes=3, per_class=40, splits=("train", "test"))
    first = data.load_text_dataset(str(folder), "sentence", "topic", seed=1)
    again = data.load_text_dataset(str(folder), "sentence", "topic", seed=1)
    assert len(first["train"]) + len(first["validation"]) == 120
    assert Counter(first["validation"]["label"]) == {0: 4, 1: 4, 2: 4}
    assert first["validation"]["text"] == again["validation"]["text"]
    other = data.load_text_dataset(str(folder), "sentence", "topic", seed=2)
    assert other["validation"]["text"] != first["validation"]["text"]


def test_subsampling_is_stratified_seeded_and_capped(rt_dir, capsys):
    splits = data.load_text_dataset(str(rt_dir), seed=3, max_train_samples=100, max_eval_samples=5000)
    assert Counter(splits["train"]["label"]) == {0: 50, 1: 50}
    assert len(splits["test"]) == 1066 and "using all 1066" in capsys.readouterr().out
    again = data.load_text_dataset(str(rt_dir), seed=3, max_train_samples=100)
    assert again["train"]["text"] == splits["train"]["text"]


def test_data_errors_are_clear(tmp_path):
    with pytest.raises(utils.LabError, match="does not exist"):
        data.load_text_dataset(str(tmp_path / "nope" / "data"))
    folder = write_csv_dataset(tmp_path / "d", num_classes=2, per_class=10)
    with pytest.raises(utils.LabError, match="no column 'text'"):
        data.load_text_dataset(str(folder))
    pd.DataFrame({"sentence": ["a"], "topic": ["unknown-topic"]}).to_csv(folder / "test.csv", index=False)
    with pytest.raises(utils.LabError, match="unknown-topic.*never occur in train"):
        data.load_text_dataset(str(folder), "sentence", "topic")
    pd.DataFrame({"sentence": [], "topic": []}).to_csv(folder / "test.csv", index=False)
    with pytest.raises(utils.LabError, match="test split .* is empty"):
        data.load_text_dataset(str(folder), "sentence", "topic")
    (folder / "test.csv").write_bytes("sentence,topic\nclich\xe9s galore,sports\n".encode("latin-1"))
    with pytest.raises(utils.LabError, match="not UTF-8"):
        data.load_text_dataset(str(folder), "sentence", "topic")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(utils.LabError, match="no train file"):
        data.load_text_dataset(str(empty))


def test_offline_hub_id_fails_fast_with_the_offline_route(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(utils.LabError, match="'someone/some-model'.*unreachable.*local"):
        hub.resolve_pretrained("someone/some-model", "model")
