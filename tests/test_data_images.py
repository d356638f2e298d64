"""Bad image data (issue 12): degenerate classes, malformed release layouts and class-name files, and
unreadable images under bad_images=skip, down to a batch or a whole split with no readable image.

Every case builds its bad input in tmp_path and expects one LabError naming the file, class or split."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import clip
import images
from tools import build_tiny_clip
from conftest import ROOT
from test_clip import image_folder, save_image, write_truncated_jpeg
from utils import LabError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, clip_tokenizer_dir):
    folder = build_tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer_dir=str(clip_tokenizer_dir))
    return clip.load_clip(str(folder))


def release_layout(root, wnids=("n00000001", "n00000002"), per_class=2, annotations=None):
    """A tiny Tiny ImageNet release: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    for wnid in wnids:
        for i in range(per_class):
            save_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "val" / "images").mkdir(parents=True)
    lines = annotations if annotations is not None else [f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8"
                                                         for i, wnid in enumerate(wnids)]
    for line in lines:
        save_image(root / "val" / "images" / line.split("\t")[0].split()[0])
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# Degenerate classes
# ---------------------------------------------------------------------------------------------

def test_one_class_is_refused_in_folders_and_through_max_classes(tmp_path):
    one = image_folder(tmp_path / "one", classes=("zebra",))
    with pytest.raises(LabError, match=r"train split of .* has only one class, 'zebra' \(3 examples\)"):
        images.load_image_dataset(str(one))
    two = image_folder(tmp_path / "two", classes=("ant", "bee"))
    with pytest.raises(LabError, match=r"max_classes=1 leaves one class: zero-shot accuracy over one class is always 1.0"):
        images.load_image_dataset(str(two), max_classes=1)
    with pytest.raises(LabError, match=r"max_train_samples=1 should be >= 2"):
        images.load_image_dataset(str(two), max_train_samples=1)


def test_hub_dataset_with_one_class_is_refused():
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["only"])})
    table = Dataset.from_dict({"image": [{"bytes": b"x", "path": None}] * 4, "label": [0] * 4}, features=features)
    with pytest.raises(LabError, match=r"train split of the Hub dataset has only one class, 'only' \(4 examples\)"):
        images.hub_image_splits(DatasetDict({"train": table, "validation": table}))


def test_class_folders_without_a_readable_image_are_refused(tmp_path):
    root = image_folder(tmp_path / "d")
    for path in (root / "train" / "zebra").iterdir():
        path.unlink()
    (root / "train" / "zebra" / "notes.txt").write_text("no pictures here")
    with pytest.raises(LabError, match=r"class folder .*train/zebra has no image files \(.jpeg"):
        images.load_image_dataset(str(root))
    write_truncated_jpeg(root / "train" / "zebra" / "cut.jpg")
    (root / "train" / "zebra" / "text.png").write_text("not a png")
    with pytest.raises(LabError, match=r"class folder .*train/zebra has no readable image: all 2 image files fail"):
        images.load_image_dataset(str(root))
    save_image(root / "train" / "zebra" / "ok.png")                 # one readable image is enough
    assert len(images.load_image_dataset(str(root))["train"]) == 9


def test_carving_refuses_a_class_with_one_image(tmp_path):
    flat = tmp_path / "flat"
    for name, n in (("ant", 10), ("bee", 1)):
        for i in range(n):
            save_image(flat / name / f"{i}.png")
    with pytest.raises(LabError, match=r"no validation split and class 'bee' has only 1 example in train"):
        images.load_image_dataset(str(flat))


def test_validation_without_the_kept_classes_is_refused(tmp_path):
    root = image_folder(tmp_path / "d", classes=("ant", "bee", "cat"))
    for name in ("ant", "bee"):
        for path in (root / "val" / name).iterdir():
            path.unlink()
    with pytest.raises(LabError, match=r"validation split of .* has no images of the 2 classes kept \(max_classes=2\)"):
        images.load_image_dataset(str(root), max_classes=2)


# ---------------------------------------------------------------------------------------------
# Release layout and class-name files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, fragment", [
    ("missing folder", r"wnids.txt names n00000003 \(id 3\), but .*train/n00000003 is not a folder"),
    ("empty wnids", r"wnids.txt is empty; expected one WordNet id"),
    ("repeated wnid", r"wnids.txt lists \['n00000001'\] more than once"),
    ("malformed line", r"val_annotations.txt line 2 is malformed: expected '<image file><TAB><wnid>...', "
                       r"found 'val_1.JPEG'"),
    ("unknown wnid", r"val_annotations.txt line 1 labels val_0.JPEG with n09999999, which is not in wnids.txt"),
    ("no val images", r"val_annotations.txt exists but .*val/images is not a folder of images"),
    ("latin-1 wnids", r"wnids.txt is not UTF-8 text"),
])
def test_malformed_release_layouts_name_the_file_and_line(tmp_path, change, fragment):
    root = release_layout(tmp_path / "tin")
    if change == "missing folder":
        (root / "wnids.txt").write_text("n00000001\nn00000002\nn00000003\n")
    elif change == "empty wnids":
        (root / "wnids.txt").write_text("\n")
    elif change == "repeated wnid":
        (root / "wnids.txt").write_text("n00000001\nn00000002\nn00000001\n")
    elif change == "malformed line":
        (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000001\t0\t0\t8\t8\nval_1.JPEG\n")
    elif change == "unknown wnid":
        (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t0\t0\t8\t8\n")
    elif change == "no val images":
        for path in (root / "val" / "images").iterdir():
            path.unlink()
        (root / "val" / "images").rmdir()
    else:
        (root / "wnids.txt").write_bytes("n00000001\nn0000000\xe9\n".encode("latin-1"))
    with pytest.raises(LabError, match=fragment):
        images.load_image_dataset(str(root))


def test_release_files_with_bom_and_windows_line_endings_parse(tmp_path):
    root = release_layout(tmp_path / "tin")
    (root / "wnids.txt").write_bytes(b"\xef\xbb\xbfn00000001\r\nn00000002\r\n")
    (root / "val" / "val_annotations.txt").write_bytes(
        b"\xef\xbb\xbfval_0.JPEG\tn00000001\t0\t0\t8\t8\r\nval_1.JPEG\tn00000002\t0\t0\t8\t8\r\n")
    (root / "words.txt").write_bytes(b"\xef\xbb\xbfn00000001\tgoldfish, carp\r\nn00000002\tsnail\r\n")
    splits = images.load_image_dataset(str(root))
    assert splits["train"].features["label"].names == ["goldfish", "snail"]
    assert sorted(splits["validation"]["label"]) == [0, 1]


@pytest.mark.parametrize("content, fragment", [
    ('{"ant": "an ant",\n "bee" "a bee"}', r"names.json is not valid JSON: Expecting ':' delimiter at line 2"),
    ('["an ant", "a bee"]', r"names.json holds a JSON list; expected an object \{\"<class id>\": \"<name>\"\}"),
    ('{"ant": {"name": "an ant"}}', r"names.json: the name of 'ant' is \{\"name\": \"an ant\"\}; expected a non-empty"),
    ('{"ant": ""}', r"names.json: the name of 'ant' is \"\"; expected a non-empty string"),
])
def test_class_name_files_that_are_not_an_id_to_name_object_are_refused(tmp_path, content, fragment):
    (tmp_path / "names.json").write_text(content)
    with pytest.raises(LabError, match=fragment):
        images.load_image_dataset(str(image_folder(tmp_path / "d", classes=("ant", "bee"))),
                                class_names=str(tmp_path / "names.json"))


def test_class_name_file_matching_no_class_is_warned_about(tmp_path, capsys):
    (tmp_path / "names.json").write_text('{"n01443537": "goldfish"}')
    splits = images.load_image_dataset(str(image_folder(tmp_path / "d", classes=("ant", "bee"))),
                                     class_names=str(tmp_path / "names.json"))
    assert splits["train"].features["label"].names == ["ant", "bee"]
    assert "none of the 1 ids in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Unreadable images under bad_images=skip: batches and splits
# ---------------------------------------------------------------------------------------------

def unreadable_dataset(tmp_path, readable: int, unreadable: int):
    """A lazy dataset of `unreadable` broken files first, then `readable` good ones (labels 0, 1, 0, ...)."""
    from datasets import ClassLabel, Dataset, Features, Value

    paths = [str(write_truncated_jpeg(tmp_path / f"bad{i}.jpg")) for i in range(unreadable)]
    paths += [str(save_image(tmp_path / f"good{i}.png")) for i in range(readable)]
    features = Features({"image": Value("string"), "label": ClassLabel(names=["cat", "dog"])})
    table = Dataset.from_dict({"image": paths, "label": [i % 2 for i in range(len(paths))]}, features=features)
    return table, paths


def test_a_fully_unreadable_batch_is_skipped_and_counted(tmp_path, tiny_clip):
    model, tokenizer, image_processor = tiny_clip
    table, paths = unreadable_dataset(tmp_path, readable=3, unreadable=4)
    lazy = table.with_transform(clip.ImageTransform(image_processor))
    collator = clip.ImageTextCollator(tokenizer, ["cat", "dog"])
    empty = collator(lazy.__getitems__([0, 1, 2, 3]))
    assert empty["labels"].shape == (0,) and empty["kept"].tolist() == [False] * 4
    assert empty["skipped_images"] == paths[:4]
    head = clip.build_zero_shot_classifier(model, tokenizer, ["cat", "dog"])
    result = clip.evaluate_zero_shot(model.eval(), head, ["cat", "dog"], lazy, collator, batch_size=4)
    assert result.skipped_images == paths[:4] and len(result.labels) == 3
    assert result.rows.tolist() == [4, 5, 6]


def test_a_split_with_no_readable_image_is_refused_naming_it(tmp_path, tiny_clip):
    model, tokenizer, image_processor = tiny_clip
    table, paths = unreadable_dataset(tmp_path, readable=0, unreadable=3)
    lazy = table.with_transform(clip.ImageTransform(image_processor))
    collator = clip.ImageTextCollator(tokenizer, ["cat", "dog"])
    head = clip.build_zero_shot_classifier(model, tokenizer, ["cat", "dog"])
    with pytest.raises(LabError, match=r"every image of the validation split is unreadable \(3 images, e.g. .*bad0.jpg"):
        clip.evaluate_zero_shot(model, head, ["cat", "dog"], lazy, collator, batch_size=2)


@pytest.mark.parametrize("loss", ["clip", "class"])
def test_the_trainer_takes_an_empty_batch_as_a_zero_step_and_refuses_a_train_split_with_none(tmp_path, tiny_clip, loss):
    from transformers import TrainingArguments

    model, tokenizer, image_processor = tiny_clip
    model = copy.deepcopy(model).train()
    table, paths = unreadable_dataset(tmp_path, readable=0, unreadable=4)
    collator = clip.ImageTextCollator(tokenizer, ["cat", "dog"])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=2,
                             per_device_train_batch_size=2, remove_unused_columns=False, save_strategy="no",
                             label_names=["labels"], learning_rate=1e-2)
    trainer = clip.CLIPTrainer(model=model, args=args, data_collator=collator, class_names=["cat", "dog"], loss=loss,
                               train_dataset=table.with_transform(clip.ImageTransform(image_processor)))
    empty = collator(table.with_transform(clip.ImageTransform(image_processor)).__getitems__([0, 1]))
    value = trainer.compute_loss(model, empty)
    assert value.item() == 0.0
    value.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(LabError, match=r"every image of the train split read in training was unreadable \(4 images"):
        trainer.train()
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters()), "nothing may be learned"


def test_exercise_3_answers_bad_image_data_in_one_line(tmp_path):
    root = image_folder(tmp_path / "d", classes=("ant", "bee"))
    result = subprocess.run([sys.executable, "exercise_3.py", f"dataset={root}", "max_classes=1", "model_name=unused",
                             f"output_dir={tmp_path / 'runs'}", "wandb_mode=disabled"],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: max_classes=1 leaves one class"), result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "no run folder for bad data"


# ---------------------------------------------------------------------------------------------
# Class names that are one name once case and spacing are ignored, from every source
# ---------------------------------------------------------------------------------------------

def colliding_dataset(tmp_path, source: str):
    """(load(class_names) -> the splits, the two colliding class ids, a fragment of the message naming the source)."""
    import json

    if source in ("words.txt", "words.txt all"):
        root = release_layout(tmp_path / "release")
        (root / "words.txt").write_text("n00000001\tcrane\nn00000002\tCrane , derrick\n")
        style = "all" if source == "words.txt all" else "first"
        if style == "all":
            (root / "words.txt").write_text("n00000001\tcrane\nn00000002\t Crane\n")
        return (lambda names: images.load_image_dataset(str(root), class_names=names or style),
                ("n00000001", "n00000002"), f"in {root / 'words.txt'}")
    if source == "shipped":           # a folder named by its WordNet id gets the shipped name "Egyptian cat"
        root = image_folder(tmp_path / "d", classes=("egyptian_cat", "n02124075"))
        return (lambda names: images.load_image_dataset(str(root), class_names=names or "first"),
                ("egyptian_cat", "n02124075"), "its first WordNet synonym in class_names/tiny_imagenet_wordnet.json")
    if source == "class_names file":
        root = image_folder(tmp_path / "d", classes=("ant", "bee"))
        (tmp_path / "mine.json").write_text(json.dumps({"ant": "Tabby cat", "bee": "tabby  cat "}))
        return (lambda names: images.load_image_dataset(str(root), class_names=names or str(tmp_path / "mine.json")),
                ("ant", "bee"), f"from {tmp_path / 'mine.json'}")
    if source == "folders":
        root = image_folder(tmp_path / "d", classes=("Golden Retriever", "golden_retriever"))
        return (lambda names: images.load_image_dataset(str(root), class_names=names or "first"),
                ("Golden Retriever", "golden_retriever"), "its name in the dataset")
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["Tabby cat", "tabby cat "])})
    table = Dataset.from_dict({"image": [{"bytes": b"x", "path": None}] * 4, "label": [0, 1] * 2}, features=features)
    return (lambda names: images.hub_image_splits(DatasetDict({"train": table, "validation": table}),
                                                  class_names=names or "first"),
            ("Tabby cat", "tabby cat "), "its name in the dataset")


@pytest.mark.parametrize("source", ["words.txt", "words.txt all", "shipped", "class_names file", "folders", "hub"])
def test_class_names_that_collide_are_refused_unless_class_names_makes_them_unique(tmp_path, source):
    import json

    load, (first, second), named = colliding_dataset(tmp_path, source)
    with pytest.raises(LabError) as refused:
        load(None)
    message = str(refused.value)
    assert message.startswith(f"class names collide (the same once case and spacing are ignored): {first!r} (")
    assert f" and {second!r} (" in message and named in message and "\n" not in message
    assert "set class_names=<a JSON file> that renames one of them, e.g. {" in message
    if source == "words.txt":                      # another synonym of the second class is the suggested name
        assert 'e.g. {"n00000002": "derrick"}' in message

    (tmp_path / "unique.json").write_text(json.dumps({second: "a name of its own", first: "tabby cat"}))
    names = load(str(tmp_path / "unique.json"))["train"].features["label"].names
    assert sorted(names) == ["a name of its own", "tabby cat"]


def test_exercise_3_refuses_colliding_class_names_in_one_line(tmp_path):
    root = image_folder(tmp_path / "d", classes=("Golden Retriever", "golden_retriever"))
    result = subprocess.run([sys.executable, "exercise_3.py", f"dataset={root}", "model_name=unused",
                             f"output_dir={tmp_path / 'runs'}", "wandb_mode=disabled"],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("error: class names collide (the same once case and spacing are ignored): "
                               "'Golden Retriever' ('Golden Retriever', its name in the dataset) and 'golden_retriever'")
