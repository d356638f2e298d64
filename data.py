"""Every dataset the exercises read, and the one place data is validated: loaders, splits, labels.

Text (exercises 1 and 2): a Hub id, the original rt-polarity folder, or train/validation/test tables.
Images (exercise 3) are read by images.py, through the same split, subsample and class checks defined here,
so splits, stratified subsamples, label ids and their checks follow one policy for both.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import hub
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
        if not (folder / f"rt-polarity.{name}").is_file():
            raise LabError(f"{folder / f'rt-polarity.{name}'} is missing; the sentence-polarity folder needs "
                           f"rt-polarity.pos and rt-polarity.neg")
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


TABLE_KINDS = {".csv": "comma-separated", ".tsv": "tab-separated", ".json": "JSON", ".jsonl": "JSON Lines",
               ".parquet": "Parquet"}


def read_text_file(path: Path) -> str:
    """A UTF-8 text file (a BOM is dropped), or a LabError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise LabError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                       f"re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except OSError as error:
        raise LabError(f"cannot read {path}: {error.strerror or error}") from None


def one_line(error) -> str:
    return " ".join(str(error).split())[:300]


def _read_table(path: Path, columns: tuple[str, str]):
    """A table file as a DataFrame with `columns`, or a LabError naming the file, the columns expected
    and what was found. CSV/TSV: empty cells are missing, "NA" or "null" stay text; BOMs are dropped."""
    import pandas as pd

    expected = f"a table with columns {columns[0]!r} and {columns[1]!r}"
    suffix = path.suffix.lower()
    if path.is_dir():
        raise LabError(f"{path} is a folder; expected {expected} ({', '.join(TABLE_SUFFIXES)})")
    if suffix not in TABLE_SUFFIXES:
        raise LabError(f"{path} is not a table file: expected {expected} in one of {', '.join(TABLE_SUFFIXES)}")
    if path.stat().st_size == 0 or (suffix != ".parquet" and not read_text_file(path).strip()):
        raise LabError(f"{path} is empty; expected {expected}, with a header row")
    try:
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", encoding="utf-8-sig",
                                keep_default_na=False, na_values=[""])
        elif suffix in (".json", ".jsonl"):
            frame = pd.DataFrame.from_records(_read_json_records(path, suffix))
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError:
        read_text_file(path)            # raises the not-UTF-8 LabError
        raise
    except pd.errors.EmptyDataError:
        raise LabError(f"{path} is empty; expected {expected}, with a header row") from None
    except (pd.errors.ParserError, ValueError, OSError) as error:
        raise LabError(f"{path} is not a readable {TABLE_KINDS[suffix]} file ({one_line(error)}); "
                       f"expected {expected}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = list(frame.columns)
        hint = "set text_column= / label_column= to your column names"
        other = next((name for sep, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"), (",", "comma"))
                      if len(found) == 1 and sep in found[0]), None)
        if other:
            fix = {"tab": "rename it to .tsv", "comma": "rename it to .csv"}.get(
                other, "re-save it comma-separated (.csv) or tab-separated (.tsv)")
            hint = f"the header looks {other}-separated, but a {suffix} file is read as {TABLE_KINDS[suffix]}: {fix}"
        raise LabError(f"{path} has no column {missing[0]!r}: expected columns {columns[0]!r} and {columns[1]!r}, "
                       f"found {found}; {hint}")
    return frame


def _read_json_records(path: Path, suffix: str) -> list[dict]:
    """A JSON array of objects, or JSON Lines (one object per line; blank lines skipped)."""
    text = read_text_file(path)
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise LabError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}; "
                           f"expected an array of objects or one object per line") from None
    else:
        records = []
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise LabError(f"{path} line {number} is not valid JSON ({error.msg}, column {error.colno}); "
                                   f"expected one JSON object per line (JSON Lines)") from None
    bad = next((i for i, record in enumerate(records, 1) if not isinstance(record, dict)), None)
    if bad is not None:
        raise LabError(f"{path}: record {bad} is a JSON {type(records[bad - 1]).__name__}, not an object; "
                       f"expected one object per row, e.g. {{\"text\": \"...\", \"label\": 0}}")
    return records


def _find_split_files(folder: Path) -> dict:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        matches = [p for alias in aliases for p in sorted(folder.iterdir())
                   if p.stem == alias and p.suffix.lower() in TABLE_SUFFIXES]
        if len(matches) > 1:
            raise LabError(f"{len(matches)} files for the {split} split in {folder}: "
                           f"{', '.join(p.name for p in matches)}; keep one (which one to read is ambiguous)")
        if matches:
            found[split] = matches[0]
    return found


def _is_missing(value) -> bool:
    import pandas as pd

    if isinstance(value, str):
        return not value.strip()
    return not isinstance(value, (list, tuple, dict, set, np.ndarray)) and bool(pd.isna(value))


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:5])
    return f"row{'s' if len(numbers) > 1 else ''} {shown}{', ...' if len(numbers) > 5 else ''}"


def check_cells(values: list, source: str, column: str, kind: str) -> list:
    """The cells of a text (`kind` "text") or label column, checked: missing, empty and nested values
    (lists, objects) are refused naming their rows (1 = the first data row). Numbers in a text column
    become text; whole-number float labels (1.0) become ints; label strings lose surrounding spaces."""
    missing, nested, cleaned = [], [], []
    for row, value in enumerate(values, 1):
        if isinstance(value, (list, tuple, dict, set, np.ndarray)) or (kind == "text" and isinstance(value, bytes)):
            nested.append(row)
        elif _is_missing(value):
            missing.append(row)
        elif isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and kind == "label" and value.is_integer():
            value = int(value)
        if isinstance(value, str) and kind == "label":
            value = value.strip()
        cleaned.append(str(value) if kind == "text" and not isinstance(value, str) else value)
    if nested:
        raise LabError(f"{source}: column {column!r} holds nested values (lists or objects) at {_rows(nested)}; "
                       f"expected one {'string' if kind == 'text' else 'label (a string or an integer)'} per row")
    if missing:
        what = "empty or missing text" if kind == "text" else "missing labels"
        raise LabError(f"{source}: {len(missing)} {what} in column {column!r}, {_rows(missing)} "
                       f"(row 1 = the first data row); fill or delete those rows")
    return cleaned


def check_classes(labels, where: str, hint: str = "", names: list[str] | None = None) -> None:
    """At least two classes in `labels` (raw labels, or ids into `names`): one class makes every score
    meaningless (exercise 2 would even build a regression head)."""
    from collections import Counter

    counts = Counter(labels)
    if len(counts) < 2:
        label, n = next(iter(counts.items()), (None, 0))
        found = f"only one class, {str(names[label] if names else label)!r} ({n} examples)" if n else "no examples"
        raise LabError(f"{where} has {found}; a classifier needs at least two classes{hint}")


def warn_small_classes(labels, names: list[str], where: str) -> None:
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(names))
    small = [f"{names[i]!r} ({counts[i]})" for i in np.flatnonzero((counts > 0) & (counts < 2))]
    if small:
        print(f"warning: {len(small)} classes have a single example in {where}: {', '.join(small[:5])}; "
              f"their scores will rest on one example", file=sys.stderr)


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


def carve_split(labels, fraction: float, seed: int, dataset: str, split: str,
                names: list[str] | None = None) -> tuple[list, list]:
    """(rest, carved) rows of train when the data has no `split`: the one carving policy of every loader.
    A class with fewer than 2 examples, or one the carve would take wholly out of train, is refused."""
    labels = [int(label) for label in labels]
    counts = np.bincount(labels) if labels else np.zeros(0, dtype=int)
    name = (lambda i: repr(names[i]) if names and i < len(names) else repr(i))
    too_small = np.flatnonzero((counts > 0) & (counts < 2))
    if len(too_small):
        raise LabError(f"{dataset} has no {split} split and class {name(too_small[0])} has only "
                       f"{counts[too_small[0]]} example in train ({len(too_small)} such classes); carving a stratified "
                       f"{split} split needs at least 2 per class: add examples or give a {split} file")
    rest, carved = stratified_indices(labels, fraction, seed)
    lost = sorted(set(np.flatnonzero(counts)) - {labels[i] for i in rest})
    if lost:
        raise LabError(f"carving a {split} split from {dataset} would leave class {name(lost[0])} "
                       f"({counts[lost[0]]} examples) with none in train; add examples or give a {split} file")
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
    hub_names, sources = None, {}
    if path.is_dir() and (path / "rt-polarity.pos").exists():
        loaded = load_rt_polarity(path)
        raw, hub_names = loaded["splits"], loaded["label_names"]
    elif path.is_dir() or path.is_file():
        files = _find_split_files(path) if path.is_dir() else {"train": path}
        if "train" not in files:
            raise LabError(f"no train file in {path}: expected train.csv / train.json(l) / train.parquet "
                           f"(and optionally validation.*, test.*)")
        sources = {split: str(file) for split, file in files.items()}
        raw = {}
        for split, file in files.items():
            frame = _read_table(file, (text_column, label_column))
            raw[split] = {"text": frame[text_column].tolist(), "label": frame[label_column].tolist()}
    else:
        raw, hub_names = _load_hub_text(dataset, text_column, label_column)
    for split, columns in raw.items():
        if not columns["text"]:
            raise LabError(f"the {split} split of {dataset} is empty")
        source = sources.get(split, f"the {split} split of {dataset}")
        columns["text"] = check_cells(columns["text"], source, text_column, "text")
        columns["label"] = check_cells(columns["label"], source, label_column, "label")
    check_classes(raw["train"]["label"], f"the train split of {sources.get('train', dataset)}")
    ids, names = _labels_to_ids({split: columns["label"] for split, columns in raw.items()}, hub_names)
    splits = {split: {"text": raw[split]["text"], "label": ids[split]} for split in raw}
    for split in ("test", "validation"):
        if split not in splits:
            rest, carved = carve_split(splits["train"]["label"], validation_fraction, seed, dataset, split, names)
            splits[split], splits["train"] = _select(splits["train"], carved), _select(splits["train"], rest)
    for split in SPLITS:
        limit = max_train_samples if split == "train" else max_eval_samples
        splits[split] = _select(splits[split], subsample_rows(splits[split]["label"], limit, seed, split))
    check_classes(splits["train"]["label"], f"the train split of {dataset} after max_train_samples={max_train_samples}",
                  f"; use max_train_samples >= {len(names)} (one per class)", names)
    warn_small_classes(splits["train"]["label"], names, f"the train split of {dataset}")
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
