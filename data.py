"""Every dataset the exercises read, and the one place data is validated: loaders, splits, labels.

Text (exercises 1 and 2): a Hub id, the original rt-polarity folder, or train/validation/test tables.
Images (exercise 3): `load_image_dataset` here, its readers in images.py. Splits, stratified subsamples,
label ids and the checks on them (classes, labels, cells) follow one policy for both.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import hub
import utils
from utils import LabError


SPLITS = ("train", "validation", "test")


SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"),
                 "test": ("test",)}


TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def load_rt_polarity(folder: Path) -> dict:
    """The Hub's rotten_tomatoes splits (8530/1066/1066) from the original latin-1 files.

    Recipe from the HF builder: readlines, strip, keep file order, cut both classes at
    int(n*0.8+0.5) and int(n*0.9+0.5); neg=0, pos=1. Split on "\\n" only: U+0085 is a line
    break to str.splitlines().
    """
    classes = {}
    for name in ("neg", "pos"):
        with open(folder / f"rt-polarity.{name}", encoding="latin-1", newline="\n") as handle:
            classes[name] = [line.strip() for line in handle.readlines()]
    splits = {split: {"text": [], "label": []} for split in SPLITS}
    for label, name in ((1, "pos"), (0, "neg")):
        lines = classes[name]
        cut1, cut2 = int(len(lines) * 0.8 + 0.5), int(len(lines) * 0.9 + 0.5)
        for split, part in zip(SPLITS, (lines[:cut1], lines[cut1:cut2], lines[cut2:])):
            splits[split]["text"] += part
            splits[split]["label"] += [label] * len(part)
    return {"splits": splits, "label_names": ["neg", "pos"]}


def _read_table(path: Path):
    import pandas as pd

    try:
        if path.suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", encoding="utf-8")
        if path.suffix in (".json", ".jsonl"):
            return pd.read_json(path, lines=path.suffix == ".jsonl" or _is_json_lines(path))
        return pd.read_parquet(path)
    except UnicodeDecodeError as error:
        raise LabError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                       f"re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _is_json_lines(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return handle.read(1) != "["


def _find_split_files(folder: Path) -> dict:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            matches = [p for p in sorted(folder.iterdir()) if p.stem == alias and p.suffix in TABLE_SUFFIXES]
            if matches:
                found[split] = matches[0]
                break
    return found


def _labels_to_ids(raw: dict, hub_names: list | None) -> tuple[dict, list[str]]:
    """Map every split's raw labels to ids 0..K-1 and return the class names.

    String labels: sorted unique names from train. Ints 0..K-1 keep their ids (names from the
    Hub's ClassLabel when known); other ints are mapped in sorted order. Validation or test
    labels never seen in train are an error.
    """
    values = set(raw["train"])
    integer = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
    unique = sorted(values) if integer else sorted(values, key=str)
    if integer and unique == list(range(len(unique))):
        names = list(hub_names) if hub_names and len(hub_names) >= len(unique) else [str(v) for v in unique]
        mapping = {v: int(v) for v in unique}
    else:
        names = [str(v) for v in unique]
        mapping = {v: i for i, v in enumerate(unique)}
    ids = {}
    for split, values in raw.items():
        unseen = sorted({str(v) for v in values if v not in mapping})
        if unseen:
            raise LabError(f"labels {unseen[:5]} in the {split} split never occur in train; "
                           f"train has {names}")
        ids[split] = [mapping[v] for v in values]
    return ids, names


def stratified_indices(labels: list[int], size: int | float, seed: int) -> tuple[list, list]:
    """Split indices into (rest, picked) with `size` picked, stratified by label when possible."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    n_pick = size if isinstance(size, int) else int(round(size * len(labels)))
    stratify = labels if counts[counts > 0].min() >= 2 and len(set(labels)) <= n_pick <= len(labels) - len(set(labels)) else None
    rest, picked = train_test_split(indices, test_size=n_pick, random_state=seed, stratify=stratify)
    return sorted(rest.tolist()), sorted(picked.tolist())


def carve_split(labels, fraction: float, seed: int, dataset: str, split: str) -> tuple[list, list]:
    """(rest, carved) rows of train when the data has no `split`: the one carving policy of every loader."""
    rest, carved = stratified_indices(list(labels), fraction, seed)
    print(f"{dataset} has no {split} split: carving {len(carved)} examples from train (stratified, seed {seed})")
    return rest, carved


def subsample_rows(labels, n: int | None, seed: int, split: str) -> list[int]:
    """Rows of a stratified, seeded subsample of `n` (every row when `n` is None or not smaller)."""
    if n is None or n >= len(labels):
        if n is not None and n > len(labels):
            print(f"max samples {n} > {len(labels)} examples in {split}: using all {len(labels)}")
        return list(range(len(labels)))
    return stratified_indices(list(labels), n, seed)[1]


def _select(columns: dict, rows: list[int]) -> dict:
    return {key: [values[i] for i in rows] for key, values in columns.items()}


def load_text_dataset(dataset: str, text_column: str = "text", label_column: str = "label",
                      seed: int = 0, max_train_samples: int | None = None,
                      max_eval_samples: int | None = None, validation_fraction: float = 0.1):
    """Load a text classification dataset as a DatasetDict with `text` and `label` (ClassLabel).

    `dataset`: a Hub id, the original rt-polarity folder, or a folder of train/validation/test
    CSV/TSV/JSON(L)/Parquet files (string or int labels, any number of classes). Missing
    validation (and test) splits are carved from train, stratified and seeded. Subsampling is
    stratified and seeded; validation and test share `max_eval_samples`.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    path = Path(dataset).expanduser()
    hub_names = None
    if path.is_dir() and (path / "rt-polarity.pos").exists():
        loaded = load_rt_polarity(path)
        raw, hub_names = loaded["splits"], loaded["label_names"]
    elif path.is_dir() or path.is_file():
        files = _find_split_files(path) if path.is_dir() else {"train": path}
        if "train" not in files:
            raise LabError(f"no train file in {path}: expected train.csv / train.json(l) / train.parquet "
                           f"(and optionally validation.*, test.*)")
        raw = {}
        for split, file in files.items():
            frame = _read_table(file)
            missing = [c for c in (text_column, label_column) if c not in frame.columns]
            if missing:
                raise LabError(f"{file} has no column {missing[0]!r} (columns: {list(frame.columns)}); "
                               f"set text_column= / label_column=")
            raw[split] = {"text": frame[text_column].astype(str).tolist(),
                          "label": frame[label_column].tolist()}
    else:
        raw, hub_names = _load_hub_text(dataset, text_column, label_column)
    for split, columns in raw.items():
        if not columns["text"]:
            raise LabError(f"the {split} split of {dataset} is empty")
    ids, names = _labels_to_ids({split: columns["label"] for split, columns in raw.items()}, hub_names)
    splits = {split: {"text": raw[split]["text"], "label": ids[split]} for split in raw}
    for split in ("test", "validation"):
        if split not in splits:
            rest, carved = carve_split(splits["train"]["label"], validation_fraction, seed, dataset, split)
            splits[split], splits["train"] = _select(splits["train"], carved), _select(splits["train"], rest)
    for split in SPLITS:
        limit = max_train_samples if split == "train" else max_eval_samples
        splits[split] = _select(splits[split], subsample_rows(splits[split]["label"], limit, seed, split))
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict({split: Dataset.from_dict(splits[split], features=features) for split in SPLITS})


def _load_hub_text(dataset: str, text_column: str, label_column: str):
    from datasets import load_dataset

    source = hub.resolve_pretrained(dataset, "dataset", "dataset=<a folder with rt-polarity.pos/.neg or train/validation/test CSV files>")
    loaded = load_dataset(source)
    label_feature = loaded["train"].features.get(label_column)
    hub_names = getattr(label_feature, "names", None)
    raw = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in loaded:
                columns = loaded[alias]
                for column in (text_column, label_column):
                    if column not in columns.column_names:
                        raise LabError(f"{dataset} has no column {column!r} (columns: {columns.column_names})")
                raw[split] = {"text": columns[text_column], "label": columns[label_column]}
                break
    return raw, hub_names


IMAGE_NAMES = ("load_image_dataset", "hub_image_splits", "readable_class_names", "read_wordnet_words",
               "read_release_layout", "read_image_folder", "to_rgb", "open_rgb", "image_id", "IMAGE_SUFFIXES")


def load_image_dataset(*args, **kwargs):
    """Exercise 3's image dataset: see images.load_image_dataset (the same arguments)."""
    import images

    return images.load_image_dataset(*args, **kwargs)


def __getattr__(name: str):
    """The image readers moved to images.py; `data.<name>` still finds them."""
    if name in IMAGE_NAMES:
        import images

        return getattr(images, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
