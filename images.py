"""Image datasets for exercise 3: the Tiny ImageNet release layout, ImageFolders and Hub image datasets,
class names, and image decoding (RGB conversion, names for images).

Splits, subsamples and label checks follow data.py's one policy; every file read here is checked as it
is read (wnids.txt, val_annotations.txt, class-name JSON files, class folders) and a problem ends in one
LabError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

import data
import hub
import zero_shot_metadata
from data import SPLIT_ALIASES, carve_split, subsample_rows
from utils import LabError


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


WORDNET_ID = re.compile(r"^n\d{8}$")

NAME_STYLES = ("clip", "first", "all")      # class_names values that are not a file


# Shipped with the project: the WordNet synonyms of Tiny ImageNet's 200 classes, for data whose labels are
# WordNet ids and that brings no words.txt of its own (the Hub's zh-plus/tiny-imagenet, a bare release folder)
SHIPPED_WORDS = Path(__file__).resolve().parent / "class_names" / "tiny_imagenet_wordnet.json"


def shipped_wordnet_words() -> dict:
    """wnid -> comma-separated synonyms for the 200 Tiny ImageNet classes (SHIPPED_WORDS)."""
    return json.loads(SHIPPED_WORDS.read_text(encoding="utf-8"))["synonyms"]


def read_wordnet_words(words_file: Path) -> dict:
    """wnid -> comma-separated synonyms, from the release's words.txt (`wnid<TAB>names`)."""
    words = {}
    for line in data.read_text_file(words_file).splitlines():
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.strip()
    return words


def readable_class_names(raw_names: list[str], style: str = "first", words_file: Path | None = None) -> list[str]:
    """Readable names for prompts, one per class and all distinct (check_unique_names).

    `raw_names` are WordNet ids or folder names. `style`: "clip" (the CLIP authors' curated ImageNet name,
    zero_shot_metadata.py, for the ids it knows; else "first"), "first" (first WordNet synonym), "all" (every
    synonym, as in words.txt), or the path of a JSON file {raw name: readable name} (classes it leaves out fall
    back to "first"). Synonyms come from `words_file` (a release's words.txt)
    and, for the ids it lacks, from the names shipped for Tiny ImageNet. Folder names lose their underscores.
    """
    custom = {}
    if style not in NAME_STYLES:
        custom_file = Path(style).expanduser()
        if not custom_file.is_file():
            raise LabError(f"class_names must be 'clip', 'first', 'all' or a JSON file of names; {style!r} is none "
                           f"of these")
        custom = read_class_names_file(custom_file)
        unused = sorted(set(custom) - set(raw_names))
        if len(unused) == len(custom):
            print(f"warning: none of the {len(custom)} ids in {custom_file} is a class of this dataset "
                  f"(e.g. {unused[0]!r}; classes are e.g. {list(raw_names[:3])})", file=sys.stderr)
    own = read_wordnet_words(words_file) if words_file else {}
    words = {**shipped_wordnet_words(), **own}
    curated = zero_shot_metadata.clip_class_names() if style == "clip" else {}
    names, sources = [], []     # where each name comes from, for the message when two collide
    for raw in raw_names:
        if raw in custom:
            names.append(str(custom[raw]))
            sources.append(f"from {custom_file}")
        elif raw in curated:
            names.append(curated[raw])
            sources.append(f"CLIP's name in {zero_shot_metadata.CLIP_CLASS_NAMES.parent.name}/"
                           f"{zero_shot_metadata.CLIP_CLASS_NAMES.name}")
        elif raw in words:
            names.append(words[raw] if style == "all" else words[raw].split(",")[0].strip())
            sources.append(f"{'its WordNet synonyms' if style == 'all' else 'its first WordNet synonym'} in "
                           f"{words_file if raw in own else f'{SHIPPED_WORDS.parent.name}/{SHIPPED_WORDS.name}'}")
        else:
            names.append(raw.replace("_", " "))
            sources.append("its name in the dataset")
    untranslated = [raw for raw, name in zip(raw_names, names) if WORDNET_ID.match(name)]
    if untranslated:
        print(f"warning: no readable name for {len(untranslated)} WordNet ids (e.g. {untranslated[0]}); "
              f"prompts will use the ids. Point to a words.txt or set class_names=<names.json>")
    check_unique_names(raw_names, names, sources, words)
    return names


def check_unique_names(raw_names: list[str], names: list[str], sources: list[str], words: dict) -> None:
    """Two classes whose names differ only in case or spacing get one prompt, and no zero-shot head can tell
    them apart: refused, naming both classes, the name and where each came from, unless class_names gives one
    a name of its own. WordNet's first synonyms collide too (ImageNet has two "crane"s, a bird and a machine):
    the raw id appended ("crane (n03126707)") would keep them apart in the label list only, as CLIP reads the
    same word in both prompts, so those are refused as well, with another synonym as the suggested fix."""
    seen = {}
    for raw, name, source in zip(raw_names, names, sources):
        seen.setdefault(" ".join(name.split()).casefold(), []).append((raw, name, source))
    clashes = [group for group in seen.values() if len(group) > 1]
    if not clashes:
        return
    listed = " and ".join(f"{raw!r} ({name!r}, {source})" for raw, name, source in clashes[0])
    more = f" ({len(clashes) - 1} more names collide: {', '.join(repr(c[0][1]) for c in clashes[1:4])})" \
        if len(clashes) > 1 else ""
    last = clashes[0][-1][0]
    synonyms = [synonym.strip() for synonym in words.get(last, "").split(",")[1:] if synonym.strip()]
    example = json.dumps({last: synonyms[0] if synonyms else "<a name of its own>"})
    raise LabError(f"class names collide (the same once case and spacing are ignored): {listed}{more}; every "
                   f"class needs a name of its own for its prompts: set class_names=<a JSON file> that renames "
                   f"one of them, e.g. {example}")


def read_class_names_file(path: Path) -> dict:
    """A class_names JSON file: one object {class id: readable name}, every name a non-empty string."""
    try:
        custom = json.loads(data.read_text_file(path))
    except json.JSONDecodeError as error:
        raise LabError(f"class_names file {path} is not valid JSON: {error.msg} at line {error.lineno}, "
                       f"column {error.colno}; expected an object {{\"<class id>\": \"<name>\"}}") from None
    if not isinstance(custom, dict):
        raise LabError(f"class_names file {path} holds a JSON {type(custom).__name__}; expected an object "
                       f"{{\"<class id>\": \"<name>\"}}, e.g. {{\"n02124075\": \"Egyptian cat\"}}")
    bad = next((key for key, name in custom.items() if not isinstance(name, str) or not name.strip()), None)
    if bad is not None:
        raise LabError(f"class_names file {path}: the name of {bad!r} is {json.dumps(custom[bad])[:60]}; "
                       f"expected a non-empty string")
    return custom


def image_files(folder: Path) -> list[str]:
    """Every image file below `folder` (by its suffix, IMAGE_SUFFIXES), sorted."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_release_layout(folder: Path) -> tuple[dict, list[str]]:
    """Tiny ImageNet as released: classes from wnids.txt (index = line), train/<wnid>/images/*,
    val/images/* labelled by val/val_annotations.txt. Returns ({split: (paths, labels)}, wnids)."""
    wnids_file = folder / "wnids.txt"
    wnids = data.read_text_file(wnids_file).split()
    if not wnids:
        raise LabError(f"{wnids_file} is empty; expected one WordNet id (a folder name in {folder / 'train'}) per line")
    repeated = sorted({wnid for wnid in wnids if wnids.count(wnid) > 1})
    if repeated:
        raise LabError(f"{wnids_file} lists {repeated[:3]} more than once; expected each class once")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    paths, labels = [], []
    for number, wnid in enumerate(wnids, 1):
        if not (folder / "train" / wnid).is_dir():
            raise LabError(f"{wnids_file} names {wnid} (id {number}), but {folder / 'train' / wnid} is not a folder; "
                           f"expected train/<wnid>/images/ for every id in wnids.txt")
        files = image_files(folder / "train" / wnid)
        paths += files
        labels += [index[wnid]] * len(files)
    splits = {"train": (paths, labels)}
    annotations = folder / "val" / "val_annotations.txt"
    if annotations.exists():
        if not (folder / "val" / "images").is_dir():
            raise LabError(f"{annotations} exists but {folder / 'val' / 'images'} is not a folder of images")
        val_paths, val_labels = [], []
        for number, line in enumerate(data.read_text_file(annotations).splitlines(), 1):
            fields = line.split("\t") if "\t" in line else line.split()
            if not line.strip():
                continue
            if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
                raise LabError(f"{annotations} line {number} is malformed: expected '<image file><TAB><wnid>...', "
                               f"found {line[:80]!r}")
            filename, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise LabError(f"{annotations} line {number} labels {filename} with {wnid}, which is not in wnids.txt")
            val_paths.append(str(folder / "val" / "images" / filename))
            val_labels.append(index[wnid])
        splits["validation"] = (val_paths, val_labels)
    return splits, wnids


def read_image_folder(folder: Path) -> tuple[dict, list[str]]:
    """One sub-folder per class, either directly in `folder` (one split) or inside train/ and
    val/ (or validation/, valid/). Classes come from the train folders, sorted."""
    split_dirs = {"train": folder}
    if (folder / "train").is_dir():
        split_dirs = {"train": folder / "train"}
        found = [folder / alias for alias in SPLIT_ALIASES["validation"] if (folder / alias).is_dir()]
        if found:
            split_dirs["validation"] = found[0]
    classes = sorted(p.name for p in split_dirs["train"].iterdir() if p.is_dir())
    if not classes:
        raise LabError(f"{split_dirs['train']} has no class sub-folders; an image dataset folder needs one "
                       f"folder of images per class (or the Tiny ImageNet release layout)")
    splits = {}
    for split, split_dir in split_dirs.items():
        unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes)
        if unknown:
            raise LabError(f"classes {unknown[:5]} in {split_dir} have no folder in {split_dirs['train']}")
        paths, labels = [], []
        for label, name in enumerate(classes):
            files = image_files(split_dir / name) if (split_dir / name).is_dir() else []
            paths += files
            labels += [label] * len(files)
        splits[split] = (paths, labels)
    return splits, classes


def _select_rows(labels, max_classes: int | None, max_samples: int | None, seed: int, split: str) -> np.ndarray:
    """Rows of the first `max_classes` classes, then a stratified, seeded subsample of them."""
    labels = np.asarray(labels)
    rows = np.arange(len(labels)) if max_classes is None else np.flatnonzero(labels < max_classes)
    return rows[subsample_rows(labels[rows].tolist(), max_samples, seed, split)]


def load_image_dataset(dataset: str, seed: int = 0, max_train_samples: int | None = None,
                       max_eval_samples: int | None = None, max_classes: int | None = None,
                       class_names: str = "first", validation_fraction: float = 0.1):
    """A DatasetDict with train and validation splits; columns `image` (a file path, or the Hub's
    undecoded {bytes, path}) and `label` (ClassLabel with readable names). No image is opened here.

    `dataset`: the Tiny ImageNet release folder (wnids.txt, words.txt, train/, val/), an ImageFolder
    (class sub-folders, optionally under train/ and val/), or a Hub id. Without a validation split,
    one is carved from train (stratified, seeded). `max_classes` keeps the first N classes.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    check_max_classes(max_classes)
    path = Path(dataset).expanduser()
    if not path.exists() and (dataset.startswith((".", "/", "~")) or dataset.count("/") > 1):
        raise LabError(f"dataset path {dataset!r} does not exist")
    if not path.exists():
        return _load_hub_images(dataset, seed, max_train_samples, max_eval_samples, max_classes, class_names,
                                validation_fraction)
    if not path.is_dir():
        raise LabError(f"dataset {dataset!r} is a file; give a folder (Tiny ImageNet release layout or one "
                       f"sub-folder of images per class) or a Hub id")
    if (path / "wnids.txt").exists():
        splits, raw_names = read_release_layout(path)
    else:
        splits, raw_names = read_image_folder(path)
    train_dir = path / "train" if (path / "train").is_dir() else path
    check_class_images(*splits["train"], raw_names[:max_classes], train_dir)
    words_file = path / "words.txt" if (path / "words.txt").exists() else None
    if "validation" not in splits:
        paths, labels = splits["train"]
        rest, carved = carve_split(labels, validation_fraction, seed, dataset, "validation", raw_names)
        splits = {"train": ([paths[i] for i in rest], [labels[i] for i in rest]),
                  "validation": ([paths[i] for i in carved], [labels[i] for i in carved])}
    if max_classes is not None:
        raw_names = raw_names[:max_classes]
    names = readable_class_names(raw_names, class_names, words_file)
    features = Features({"image": Value("string"), "label": ClassLabel(names=names)})
    tables = {}
    for split, (paths, labels) in splits.items():
        if not paths:
            raise LabError(f"the {split} split of {dataset} has no images ({', '.join(IMAGE_SUFFIXES)})")
        limit = max_train_samples if split == "train" else max_eval_samples
        rows = _select_rows(labels, max_classes, limit, seed, split)
        check_selection([labels[i] for i in rows], split, dataset, names, max_classes, max_train_samples)
        tables[split] = Dataset.from_dict({"image": [paths[i] for i in rows], "label": [labels[i] for i in rows]},
                                          features=features)
    return DatasetDict(tables)


def check_max_classes(max_classes: int | None) -> None:
    if max_classes is not None and max_classes < 2:
        raise LabError(f"max_classes={max_classes} leaves one class: zero-shot accuracy over one class is always "
                       f"1.0 and a contrastive loss has no negatives; use max_classes >= 2 (or none for all)")


def check_selection(labels: list[int], split: str, dataset: str, names: list[str], max_classes, max_train_samples) -> None:
    """A selected split is not empty, and train keeps at least two classes."""
    if not labels:
        raise LabError(f"the {split} split of {dataset} has no images of the {len(names)} classes kept "
                       f"(max_classes={max_classes})")
    if split == "train":
        hint = f"; max_train_samples={max_train_samples} should be >= {len(names)}" if max_train_samples else ""
        data.check_classes(labels, f"the train split of {dataset}", hint, names)


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        open_rgb(path)
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def check_class_images(paths: list[str], labels: list[int], raw_names: list[str], train_dir: Path) -> None:
    """Every class kept (`raw_names`) has at least one readable training image. Opens one image per class
    in the good case (the first readable one), so the check costs little beside loading the split."""
    by_class = {}
    for path, label in zip(paths, labels):
        by_class.setdefault(label, []).append(path)
    for label, raw in enumerate(raw_names):
        files = by_class.get(label, [])
        if not files:
            raise LabError(f"class folder {train_dir / raw} has no image files ({', '.join(IMAGE_SUFFIXES)}); "
                           f"every class needs training images")
        if not any(_readable(file) for file in files):
            raise LabError(f"class folder {train_dir / raw} has no readable image: all {len(files)} image files "
                           f"fail to open (e.g. {files[0]})")


def hub_image_splits(loaded, seed: int = 0, max_train_samples: int | None = None,
                     max_eval_samples: int | None = None, max_classes: int | None = None,
                     class_names: str = "first", validation_fraction: float = 0.1, words_file: Path | None = None):
    """A Hub DatasetDict (an Image column and a ClassLabel column) in this module's format: image
    bytes stay undecoded in the Hub's own cache; only row selections and feature types change."""
    from datasets import ClassLabel, DatasetDict, Image

    check_max_classes(max_classes)
    split_names = {}
    for split in ("train", "validation"):
        found = [alias for alias in SPLIT_ALIASES[split] if alias in loaded]
        if found:
            split_names[split] = found[0]
    if "train" not in split_names:
        raise LabError(f"the dataset has no train split (splits: {list(loaded)})")
    train = loaded[split_names["train"]]
    image_column = next((c for c, f in train.features.items() if isinstance(f, Image)), None)
    label_column = next((c for c, f in train.features.items() if isinstance(f, ClassLabel)), None)
    if image_column is None or label_column is None:
        raise LabError(f"the dataset needs an image column and a class-label column; it has {dict(train.features)}")
    raw_names = train.features[label_column].names
    tables = {split: loaded[name] for split, name in split_names.items()}
    if "validation" not in tables:
        rest, carved = carve_split(train[label_column], validation_fraction, seed, "the Hub dataset", "validation",
                                   raw_names)
        tables = {"train": train.select(rest), "validation": train.select(carved)}
    if max_classes is not None:
        raw_names = raw_names[:max_classes]
    label_feature = ClassLabel(names=readable_class_names(raw_names, class_names, words_file))
    result = {}
    for split, table in tables.items():
        limit = max_train_samples if split == "train" else max_eval_samples
        labels = list(table[label_column])
        rows = _select_rows(labels, max_classes, limit, seed, split)
        check_selection([labels[i] for i in rows], split, "the Hub dataset", label_feature.names, max_classes,
                        max_train_samples)
        table = table.select(rows).select_columns([image_column, label_column])
        table = table.rename_columns({old: new for old, new in ((image_column, "image"), (label_column, "label"))
                                      if old != new})
        result[split] = table.cast_column("image", Image(decode=False)).cast_column("label", label_feature)
    return DatasetDict(result)


def _load_hub_images(dataset, seed, max_train_samples, max_eval_samples, max_classes, class_names, validation_fraction):
    from datasets import load_dataset

    source = hub.resolve_pretrained(dataset, "dataset", "dataset=<the Tiny ImageNet release folder or an "
                                      "ImageFolder>, e.g. ../shared/data/tiny-imagenet-200")
    # the Hub's Tiny ImageNet labels are WordNet ids without names: readable_class_names has them (SHIPPED_WORDS)
    return hub_image_splits(load_dataset(source), seed, max_train_samples, max_eval_samples, max_classes,
                            class_names, validation_fraction)


def to_rgb(image):
    """RGB for any PIL mode: grayscale and palette images are expanded; transparent pixels
    (RGBA, LA, palette with transparency) are laid over white instead of showing garbage."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(item):
    """A fully decoded RGB PIL image from a path, a Hub {bytes, path} dict or a PIL image."""
    import io

    from PIL import Image

    if isinstance(item, dict):
        item = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
    if isinstance(item, Image.Image):
        return to_rgb(item)
    with Image.open(item) as image:
        image.load()        # decode now, so a truncated file fails here and not in the model
        return to_rgb(image)


def pixel_digest(image) -> str:
    """A digest of a decoded image's size and a 16 x 16 nearest-neighbour sample of its pixels: the same wherever
    its file lies, and as cheap for a photo of many megapixels as for a thumbnail (hashing every pixel would cost
    a large share of decoding it). Two images that share it only share their random crops."""
    from PIL import Image

    sample = image.resize((16, 16), Image.Resampling.NEAREST).tobytes()
    return hashlib.blake2b(f"{image.size}".encode() + sample, digest_size=8).hexdigest()


def image_id(item) -> str:
    """A name for an image: its path, or a digest of its bytes when it has none."""
    if isinstance(item, dict):
        return item.get("path") or "sha1:" + hashlib.sha1(item["bytes"]).hexdigest()[:16]
    return str(item)
