"""Text data loading: the original rt-polarity files, CSV/JSON/Parquet folders, carving, subsampling, and
every kind of bad text data (degenerate classes, labels and cells; malformed tables), refused in one line."""
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


# ---------------------------------------------------------------------------------------------
# Bad input (issue 12): every case is refused with one LabError naming the file, row or class
# ---------------------------------------------------------------------------------------------

def two_class_rows(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"review number {i}" for i in range(n)], "label": ["neg", "pos"] * (n // 2)})


def write_splits(folder, train, validation=None, test=None, suffix=".csv"):
    """Write DataFrames as <split><suffix> files; a missing one is left out."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, frame in (("train", train), ("validation", validation), ("test", test)):
        if frame is None:
            continue
        path = folder / f"{split}{suffix}"
        if suffix == ".jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_csv(path, index=False)
    return folder


@pytest.mark.parametrize("name, frame, fragment", [
    ("one class", pd.DataFrame({"text": ["a", "b", "c"], "label": ["pos"] * 3}),
     r"train split of .*train.csv has only one class, 'pos' \(3 examples\); a classifier needs at least two"),
    ("missing labels", pd.DataFrame({"text": list("abcde"), "label": ["neg", "pos", None, "neg", None]}),
     r"train.csv: 2 missing labels in column 'label', rows 3, 5 \(row 1 = the first data row\)"),
    ("empty text", pd.DataFrame({"text": ["good", None, "bad", "  ", "fine"], "label": ["pos", "neg"] * 2 + ["pos"]}),
     r"train.csv: 2 empty or missing text in column 'text', rows 2, 4"),
])
def test_degenerate_train_tables_are_refused(tmp_path, name, frame, fragment):
    folder = write_splits(tmp_path / "d", frame, two_class_rows(), two_class_rows())
    with pytest.raises(utils.LabError, match=fragment):
        data.load_text_dataset(str(folder))


def test_labels_nan_nested_and_text_nested_name_their_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": null}\n{"text": "c", "label": NaN}\n')
    with pytest.raises(utils.LabError, match=r"2 missing labels in column 'label', rows 2, 3"):
        data.load_text_dataset(str(path))
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": [0, 1]}\n{"text": "c", "label": {"x": 1}}\n')
    with pytest.raises(utils.LabError, match=r"column 'label' holds nested values .* at rows 2, 3; expected one label"):
        data.load_text_dataset(str(path))
    path.write_text('{"text": {"title": "a"}, "label": 0}\n{"text": "b", "label": 1}\n')
    with pytest.raises(utils.LabError, match=r"column 'text' holds nested values .* at row 1; expected one string"):
        data.load_text_dataset(str(path))


def test_empty_text_is_never_trained_on_as_nan(tmp_path):
    frame = two_class_rows()
    frame.loc[4, "text"] = ""
    folder = write_splits(tmp_path / "d", frame, two_class_rows(), two_class_rows())
    with pytest.raises(utils.LabError, match="row 5"):
        data.load_text_dataset(str(folder))
    # "NA", "null" and "nan" written as text stay text: only empty cells are missing
    frame.loc[4, "text"] = "NA"
    frame.loc[5, "text"] = "null"
    write_splits(folder, frame)
    texts = data.load_text_dataset(str(folder))["train"]["text"]
    assert "NA" in texts and "null" in texts and "nan" not in texts


def test_one_class_left_by_subsampling_and_classes_too_small_to_carve(tmp_path):
    folder = write_splits(tmp_path / "d", two_class_rows(), two_class_rows(), two_class_rows())
    with pytest.raises(utils.LabError, match=r"after max_train_samples=1 has only one class.*max_train_samples >= 2"):
        data.load_text_dataset(str(folder), max_train_samples=1)
    rare = pd.concat([two_class_rows(), pd.DataFrame({"text": ["odd one"], "label": ["rare"]})])
    carve = write_splits(tmp_path / "carve", rare, test=two_class_rows())
    with pytest.raises(utils.LabError, match=r"no validation split and class 'rare' has only 1 example in train.*"
                                             r"at least 2 per class"):
        data.load_text_dataset(str(carve))


def test_small_class_warning_names_the_class(tmp_path, capsys):
    rare = pd.concat([two_class_rows(), pd.DataFrame({"text": ["odd one"], "label": ["rare"]})])
    folder = write_splits(tmp_path / "d", rare, two_class_rows(), two_class_rows())
    data.load_text_dataset(str(folder))
    err = capsys.readouterr().err
    assert err.startswith("warning: 1 classes have a single example in the train split") and "'rare' (1)" in err


@pytest.mark.parametrize("filename, content, fragment", [
    ("train.csv", "text;label\nnice;pos\nbad;neg\n",
     r"train.csv has no column 'text': expected columns 'text' and 'label', found \['text;label'\]; "
     r"the header looks semicolon-separated, but a .csv file is read as comma-separated: re-save it"),
    ("train.tsv", "text,label\nnice,pos\nbad,neg\n", r"found \['text,label'\]; the header looks comma-separated.*"
                                                     r"rename it to .csv"),
    ("train.csv", "text\tlabel\nnice\tpos\n", r"the header looks tab-separated.*rename it to .tsv"),
    ("train.csv", "", r"train.csv is empty; expected a table with columns 'text' and 'label'"),
    ("train.jsonl", "\n\n", r"train.jsonl is empty"),
    ("train.parquet", "", r"train.parquet is empty"),
    ("train.parquet", "text,label\nnot parquet,1\n", r"train.parquet is not a readable Parquet file"),
    ("train.json", '[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]',
     r"train.json is not valid JSON: Expecting ',' delimiter at line 2"),
    ("train.jsonl", '{"text": "a", "label": 0}\n{"text": "b", label: 1}\n', r"train.jsonl line 2 is not valid JSON"),
    ("train.jsonl", '{"text": "a", "label": 0}\n["b", 1]\n', r"record 2 is a JSON list, not an object"),
    ("train.csv", 'text,label\n"a, b",pos\nc,d,e,neg\n', r"train.csv is not a readable comma-separated file .*Expected 2 fields"),
    ("notes.txt", "just some notes\n", r"notes.txt is not a table file: expected a table with columns 'text' and 'label'"),
])
def test_malformed_table_files_name_the_file_and_the_columns(tmp_path, filename, content, fragment):
    (tmp_path / filename).write_text(content)
    target = tmp_path / filename if filename == "notes.txt" else tmp_path
    with pytest.raises(utils.LabError, match=fragment):
        data.load_text_dataset(str(target))


def test_a_folder_or_two_files_for_one_split_are_refused(tmp_path):
    folder = write_splits(tmp_path / "d", two_class_rows())
    two_class_rows().to_json(folder / "train.jsonl", orient="records", lines=True)
    with pytest.raises(utils.LabError, match=r"2 files for the train split in .*: train.csv, train.jsonl; keep one"):
        data.load_text_dataset(str(folder))
    (folder / "train.jsonl").unlink()
    (folder / "val.csv").write_text("text,label\na,pos\n")
    two_class_rows().to_csv(folder / "validation.csv", index=False)
    with pytest.raises(utils.LabError, match=r"2 files for the validation split.*validation.csv, val.csv"):
        data.load_text_dataset(str(folder))
    (folder / "val.csv").unlink()
    (folder / "validation.csv").unlink()
    (folder / "test.csv").mkdir()
    with pytest.raises(utils.LabError, match=r"test.csv is a folder; expected a table with columns"):
        data.load_text_dataset(str(folder))


def test_windows_line_endings_and_byte_order_marks_parse(tmp_path):
    rows = [("a fine film", "pos"), ("a dull film", "neg")] * 4
    csv = "text,label\r\n" + "".join(f"{text},{label}\r\n" for text, label in rows)
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbf" + csv.encode())
    jsonl = "".join(f'{{"text": "{text}", "label": "{label}"}}\r\n' for text, label in rows)
    (tmp_path / "validation.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl.encode())
    (tmp_path / "test.tsv").write_bytes(b"\xef\xbb\xbf" + csv.replace(",", "\t").encode())
    splits = data.load_text_dataset(str(tmp_path))
    assert splits["train"].features["label"].names == ["neg", "pos"]
    for split in splits:
        assert splits[split]["text"][:2] == ["a fine film", "a dull film"] and splits[split]["label"][:2] == [1, 0]


def test_float_labels_are_whole_numbers_and_rt_polarity_needs_both_files(tmp_path):
    frame = pd.DataFrame({"text": list("abcdef"), "label": [0.0, 1.0] * 3})
    write_splits(tmp_path / "d", frame, frame, frame)
    assert data.load_text_dataset(str(tmp_path / "d"))["train"].features["label"].names == ["0", "1"]
    (tmp_path / "rt").mkdir()
    (tmp_path / "rt" / "rt-polarity.pos").write_text("good\n")
    with pytest.raises(utils.LabError, match=r"rt-polarity.neg is missing"):
        data.load_text_dataset(str(tmp_path / "rt"))


def run_script(script: str, *args: str):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("script, bad", [
    ("exercise_2.py", "one class"), ("exercise_1.py", "empty text"), ("exercise_1.py", "two train files")])
def test_scripts_answer_bad_data_with_one_error_line_and_exit_2(tmp_path, script, bad):
    train = two_class_rows()
    if bad == "one class":
        train["label"] = "pos"
    elif bad == "empty text":
        train.loc[2, "text"] = ""
    folder = write_splits(tmp_path / "data", train, two_class_rows(), two_class_rows())
    if bad == "two train files":
        train.to_json(folder / "train.jsonl", orient="records", lines=True)
    result = run_script(script, f"dataset={folder}", f"output_dir={tmp_path / 'runs'}", "model_name=unused-model",
                        "wandb_mode=disabled")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0], result.stderr
    assert {"one class": "only one class", "empty text": "row 3", "two train files": "2 files for the train split"}[bad] \
        in lines[0]
