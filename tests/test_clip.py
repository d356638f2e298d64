"""clip.py: image data (release layout, ImageFolder, Hub format), laziness, RGB conversion and bad
files, the collator, both losses against references, the zero-shot head built from the text tower as it is, LoRA counts for ViT-B/16, adapter save/load and merge, and the DDP feature gather."""
from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import LoRA
import clip
import images
import losses
import training
from conftest import ROOT
from tools import build_tiny_clip
from utils import LabError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    return build_tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer_dir=str(clip_tokenizer_dir))


@pytest.fixture(scope="module")
def loaded_tiny_clip(tiny_clip_dir):
    return clip.load_clip(str(tiny_clip_dir))


@pytest.fixture
def tiny_clip(loaded_tiny_clip):
    """(model, tokenizer, image processor); a fresh copy of the model, which tests may change."""
    model, tokenizer, image_processor = loaded_tiny_clip
    return copy.deepcopy(model).eval(), tokenizer, image_processor


def save_image(path, mode="RGB", color=(200, 30, 30), size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.new("RGB", size, color).convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "L":
        image = Image.new("L", size, color[0])
    elif mode == "RGBA":
        image = Image.new("RGBA", size, (*color, 0))      # fully transparent
    else:
        image = Image.new("RGB", size, color)
    image.save(path)
    return path


def write_truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, "JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return path


def image_folder(root, per_class=3, classes=("golden_retriever", "tabby_cat", "zebra")):
    """train/ and val/ with one folder per class; returns the root."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for split, n in (("train", per_class), ("val", 2)):
        for name, color in zip(classes, colors):
            for i in range(n):
                save_image(root / split / name / f"{i}.png", color=color)
    return root


def batch_of(dataset, indices):
    return dataset.__getitems__(list(indices))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def test_release_layout_labels_names_and_rgb(tiny_imagenet_dir, tiny_clip):
    splits = images.load_image_dataset(str(tiny_imagenet_dir))
    names = splits["train"].features["label"].names
    wnids = (tiny_imagenet_dir / "wnids.txt").read_text().split()
    words = images.read_wordnet_words(tiny_imagenet_dir / "words.txt")
    assert len(names) == 200 and len(splits["validation"]) == 10_000 and len(splits["train"]) == 10_000
    assert np.bincount(splits["validation"]["label"]).tolist() == [50] * 200
    # val labels come from val_annotations.txt, train labels from the folder, names from words.txt
    first = splits["validation"][0]
    assert first["image"].endswith("val/images/val_0.JPEG") and wnids[first["label"]] == "n03444034"
    assert names[first["label"]] == words["n03444034"].split(",")[0]
    assert names[wnids.index("n04099969")] == "rocking chair"
    for row in (0, 4321, 9999):
        item = splits["train"][row]
        assert f"/train/{wnids[item['label']]}/images/" in item["image"]
    # some images are grayscale on disk; every one reaches the model as 3 channels
    grayscale = next(path for path in splits["validation"]["image"][:2000] if Image.open(path).mode == "L")
    assert images.open_rgb(grayscale).mode == "RGB"
    row = splits["validation"]["image"].index(grayscale)
    lazy = splits["validation"].with_transform(clip.ImageTransform(tiny_clip[2]))
    assert lazy[row]["pixel_values"].shape == (3, 32, 32)


def test_max_classes_subsampling_and_name_styles(tiny_imagenet_dir, tmp_path):
    splits = images.load_image_dataset(str(tiny_imagenet_dir), seed=1, max_classes=10, max_train_samples=100,
                                   max_eval_samples=40, class_names="all")
    assert len(splits["train"]) == 100 and len(splits["validation"]) == 40
    assert set(splits["train"]["label"]) == set(range(10)) and max(splits["validation"]["label"]) < 10
    assert splits["train"].features["label"].names[3] == "rocking chair, rocker"
    names_file = tmp_path / "names.json"
    names_file.write_text(json.dumps({"n02124075": "cat"}))
    assert images.readable_class_names(["n02124075", "n04067472"], str(names_file),
                                     tiny_imagenet_dir / "words.txt") == ["cat", "reel"]
    # folder names lose underscores; two ids with one readable name are refused (test_data_images.py has every source)
    assert images.readable_class_names(["a", "b_c", "d"], "first", None) == ["a", "b c", "d"]
    words = tmp_path / "words.txt"
    words.write_text("n00000001\tbass, fish\nn00000002\tbass, guitar")
    with pytest.raises(LabError, match=r"'n00000001' \('bass', .* and 'n00000002' \('bass', .*\{\"n00000002\": \"guitar\"\}"):
        images.readable_class_names(["n00000001", "n00000002"], "first", words)
    with pytest.raises(LabError, match="class_names"):
        images.readable_class_names(["a"], "nonsense")


def test_image_folder_with_and_without_validation(tmp_path):
    splits = images.load_image_dataset(str(image_folder(tmp_path / "split")))
    assert splits["train"].features["label"].names == ["golden retriever", "tabby cat", "zebra"]
    assert (len(splits["train"]), len(splits["validation"])) == (9, 6)
    assert all("/val/" in path for path in splits["validation"]["image"])
    flat = tmp_path / "flat"
    for name in ("ant", "bee"):
        for i in range(10):
            save_image(flat / name / f"{i}.jpg")
    splits = images.load_image_dataset(str(flat), seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (18, 2)
    assert sorted(splits["validation"]["label"]) == [0, 1]              # carved stratified
    assert not set(splits["train"]["image"]) & set(splits["validation"]["image"])
    with pytest.raises(LabError, match="does not exist"):
        images.load_image_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabError, match="no class sub-folders"):
        images.load_image_dataset(str(tmp_path / "empty"))


def test_hub_format_keeps_images_undecoded_and_maps_wordnet_ids(tmp_path, tiny_clip):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    def png(color):
        buffer = io.BytesIO()
        Image.new("L", (20, 20), color).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["n00000001", "n00000002"])})
    table = {"image": [png(10 * i) for i in range(8)], "label": [0, 1] * 4}
    loaded = DatasetDict({"train": Dataset.from_dict(table, features=features),
                          "valid": Dataset.from_dict(table, features=features)})
    words = tmp_path / "words.txt"
    words.write_text("n00000001\tgoldfish, Carassius auratus\nn00000002\tsnail")
    splits = images.hub_image_splits(loaded, max_eval_samples=4, words_file=words)
    assert splits["validation"].features["label"].names == ["goldfish", "snail"]
    assert len(splits["validation"]) == 4 and isinstance(splits["train"][0]["image"], dict)
    lazy = splits["train"].with_transform(clip.ImageTransform(tiny_clip[2]))
    assert lazy[0]["pixel_values"].shape == (3, 32, 32)


def test_wordnet_ids_get_the_shipped_names_without_the_assets_folder(tmp_path, monkeypatch, tiny_imagenet_dir):
    """Users have no ../shared: the Hub's Tiny ImageNet (labels are WordNet ids) and a release folder without
    words.txt must still prompt with readable names, from the names the project ships."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    monkeypatch.setenv("LAB_SHARED_DIR", str(tmp_path / "no-assets-here"))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["n02124075", "n04067472", "n01641577"])})
    table = {"image": [{"bytes": buffer.getvalue(), "path": None}] * 6, "label": [0, 1, 2] * 2}
    loaded = DatasetDict({"train": Dataset.from_dict(table, features=features),
                          "valid": Dataset.from_dict(table, features=features)})
    assert images.hub_image_splits(loaded)["train"].features["label"].names == ["Egyptian cat", "reel", "bullfrog"]
    assert images.hub_image_splits(loaded, class_names="all")["train"].features["label"].names[2] == \
        "bullfrog, Rana catesbeiana"
    release = tmp_path / "release"                  # the release layout, words.txt left out
    (release / "train").mkdir(parents=True)
    (release / "wnids.txt").write_text("n02124075\nn04067472\n")
    for wnid in ("n02124075", "n04067472"):
        (release / "train" / wnid).symlink_to(tiny_imagenet_dir / "train" / wnid)
    names = images.load_image_dataset(str(release))["train"].features["label"].names
    assert names == ["Egyptian cat", "reel"]
    shipped = images.shipped_wordnet_words()
    assert list(shipped) == (tiny_imagenet_dir / "wnids.txt").read_text().split()
    first = [synonyms.split(",")[0].strip() for synonyms in shipped.values()]
    assert len(set(first)) == 200 and not any(images.WORDNET_ID.match(name) for name in first)


def test_transforms_are_lazy_and_write_nothing(tiny_imagenet_dir, tiny_clip):
    calls = []

    def counting_processor(images, return_tensors):
        calls.append(len(images))
        return tiny_clip[2](images=images, return_tensors=return_tensors)

    splits = images.load_image_dataset(str(tiny_imagenet_dir), max_classes=2)
    lazy = splits["validation"].with_transform(clip.ImageTransform(counting_processor))
    assert calls == []                                  # building the dataset preprocesses nothing
    assert lazy.cache_files == [] and set(splits["validation"].features) == {"image", "label"}
    assert splits["validation"].features["image"].dtype == "string"     # paths, not pixels
    lazy[3]
    assert calls == [1]
    batch_of(lazy, range(8))
    assert calls == [1, 8]                              # one processor call per batch read


def test_training_crops_depend_only_on_seed_epoch_and_image(tiny_imagenet_dir, tiny_clip):
    splits = images.load_image_dataset(str(tiny_imagenet_dir), max_classes=2, max_train_samples=4)["train"]
    transform = clip.ImageTransform(tiny_clip[2], augment_seed=0)
    lazy = splits.with_transform(transform)
    first = torch.stack([row["pixel_values"] for row in batch_of(lazy, range(4))])
    batch_of(lazy, [3, 1])                              # other reads in between draw nothing from it
    assert torch.equal(torch.stack([lazy[i]["pixel_values"] for i in range(4)]), first)
    transform.epoch = 1
    assert not torch.equal(torch.stack([row["pixel_values"] for row in batch_of(lazy, range(4))]), first)
    plain = splits.with_transform(clip.ImageTransform(tiny_clip[2]))
    assert not torch.equal(torch.stack([row["pixel_values"] for row in batch_of(plain, range(4))]), first)


def test_training_crops_do_not_depend_on_where_the_dataset_lies(tmp_path, tiny_imagenet_dir, tiny_clip):
    # the same release in another folder (another machine, a CI checkout) trains on the same crops
    moved = tmp_path / "elsewhere" / "tiny"
    (moved / "train").mkdir(parents=True)
    for name in ("wnids.txt", "val"):
        (moved / name).symlink_to(tiny_imagenet_dir / name)
    wnids = (tiny_imagenet_dir / "wnids.txt").read_text().split()
    for wnid in wnids[:2]:                              # the two classes used are copied, the rest linked
        shutil.copytree(tiny_imagenet_dir / "train" / wnid, moved / "train" / wnid)
    for wnid in wnids[2:]:
        (moved / "train" / wnid).symlink_to(tiny_imagenet_dir / "train" / wnid)
    crops = []
    for folder in (tiny_imagenet_dir, moved):
        train = images.load_image_dataset(str(folder), max_classes=2, max_train_samples=6)["train"]
        lazy = train.with_transform(clip.ImageTransform(tiny_clip[2], augment_seed=0))
        crops.append(torch.stack([row["pixel_values"] for row in batch_of(lazy, range(6))]))
    assert torch.equal(crops[0], crops[1])


def test_image_modes_converted_and_bad_files_skipped_or_fatal(tmp_path, tiny_clip):
    transparent = save_image(tmp_path / "rgba.png", "RGBA")
    assert images.open_rgb(str(transparent)).getpixel((0, 0)) == (255, 255, 255)   # laid over white
    assert images.open_rgb(str(save_image(tmp_path / "p.png", "P"))).mode == "RGB"
    assert images.open_rgb(str(save_image(tmp_path / "l.jpg", "L"))).mode == "RGB"
    truncated = write_truncated_jpeg(tmp_path / "cut.jpg")
    not_an_image = tmp_path / "text.jpg"
    not_an_image.write_text("hello")
    items = [str(transparent), str(truncated), str(tmp_path / "p.png"), str(not_an_image), str(tmp_path / "l.jpg")]
    batch = clip.ImageTransform(tiny_clip[2])({"image": items, "label": [0, 1, 0, 1, 0]})
    assert [value is None for value in batch["pixel_values"]] == [False, True, False, True, False]
    collated = clip.ImageTextCollator(tiny_clip[1], ["x", "y"])(
        [dict(zip(batch, values)) for values in zip(*batch.values())])
    assert collated["pixel_values"].shape == (3, 3, 32, 32)
    assert collated["kept"].tolist() == [True, False, True, False, True]
    assert collated["skipped_images"] == [str(truncated), str(not_an_image)]
    with pytest.raises(LabError, match="cut.jpg"):
        clip.ImageTransform(tiny_clip[2], on_bad_image="fail")({"image": items, "label": [0] * 5})


def test_collator_shapes_and_prompts(tiny_imagenet_dir, tiny_clip):
    model, tokenizer, image_processor = tiny_clip
    splits = images.load_image_dataset(str(tiny_imagenet_dir), max_classes=4, max_eval_samples=8)
    names = splits["validation"].features["label"].names
    lazy = splits["validation"].with_transform(clip.ImageTransform(image_processor))
    collator = clip.ImageTextCollator(tokenizer, names, "a photo of a {}.", clip.text_max_length(model))
    batch = collator(batch_of(lazy, range(6)))
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == splits["validation"]["label"][:6]
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 6
    for row, label in enumerate(batch["labels"].tolist()):
        expected = tokenizer(f"a photo of a {names[label]}.")["input_ids"]
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist() == expected
    assert batch["attention_mask"][:, -1].any()         # padding trimmed to this batch's longest prompt
    assert "skipped_images" not in batch


# ---------------------------------------------------------------------------------------------
# Losses and the trainer
# ---------------------------------------------------------------------------------------------

def make_trainer(model, collator, tmp_path, loss):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False,
                             label_names=["labels"])
    return clip.CLIPTrainer(model=model, args=args, data_collator=collator, class_names=["cat", "dog"], loss=loss)


def synthetic_batch(collator, labels, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "label": label, "image_id": str(i)}
                for i, label in enumerate(labels)]
    return collator(features)


def test_clip_loss_equals_transformers_on_distinct_labels(tiny_clip, tmp_path):
    model, tokenizer, _ = tiny_clip
    collator = clip.ImageTextCollator(tokenizer, ["cat", "dog", "school bus", "espresso", "lemon"])
    batch = synthetic_batch(collator, [3, 0, 4, 1, 2])
    trainer = make_trainer(model, collator, tmp_path, "clip")
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], return_loss=True).loss
    assert torch.allclose(ours, reference, atol=1e-6), (ours, reference)
    assert ours.item() > 0.1


def test_class_loss_with_repeated_labels_against_manual(tiny_clip, tmp_path):
    model, tokenizer, _ = tiny_clip
    names = ["cat", "dog", "school bus"]
    collator = clip.ImageTextCollator(tokenizer, names)
    labels = [0, 0, 2, 1, 2, 0]
    batch = synthetic_batch(collator, labels, seed=1)
    trainer = make_trainer(model, collator, tmp_path, "class")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(400.0))        # above the cap: the loss must use 100
        ours = trainer.compute_loss(model, dict(batch))
        image = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
        prompts = tokenizer([f"a photo of a {name}." for name in names], padding=True, return_tensors="pt")
        text = F.normalize(model.get_text_features(**prompts).pooler_output, dim=-1)
        manual = F.cross_entropy(100.0 * image @ text.T, torch.tensor(labels))
        # the in-batch loss counts same-class pairs as negatives: a different number
        in_batch = losses.clip_loss(image, text[torch.tensor(labels)], model.logit_scale)
    assert torch.allclose(ours, manual, atol=1e-5), (ours, manual)
    assert not torch.allclose(in_batch, manual, atol=1e-3)


def test_logit_scale_learns_below_the_cap_and_stops_at_it():
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    for value, learns in ((math.log(10.0), True), (math.log(400.0), False)):
        logit_scale = torch.tensor(value, requires_grad=True)
        losses.clip_loss(image, text, logit_scale).backward()
        assert bool(logit_scale.grad != 0) == learns
    capped = losses.clip_loss(image, text, torch.tensor(math.log(400.0)))
    assert torch.allclose(capped, losses.clip_loss(image, text, torch.tensor(math.log(100.0))))


def test_non_finite_loss_stops_before_the_update(tiny_clip, tmp_path):
    model, tokenizer, _ = tiny_clip
    collator = clip.ImageTextCollator(tokenizer, ["cat", "dog"])
    trainer = make_trainer(model, collator, tmp_path, "clip")
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    with pytest.raises(training.NonFiniteLossError, match="nan"):
        trainer.compute_loss(model, synthetic_batch(collator, [0, 1]))


# ---------------------------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------------------------

def manual_logits(model, tokenizer, names, templates, pixel_values):
    with torch.no_grad():
        per_template = []
        for template in templates:
            prompts = tokenizer([template.format(name) for name in names], padding=True, return_tensors="pt")
            per_template.append(F.normalize(model.get_text_features(**prompts).pooler_output, dim=-1))
        classes = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        image = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        return model.logit_scale.exp() * image @ classes.T


def head_logits(model, tokenizer, names, pixels, templates=clip.TEMPLATES["single"], batch_size=256):
    """Logits through the zero-shot head, built from the model as it is now."""
    with torch.inference_mode():
        head = clip.build_zero_shot_classifier(model, tokenizer, names, templates, batch_size)
        return clip.zero_shot_logits(model, pixels, head)


def test_zero_shot_classifier_equals_manual_computation(tiny_imagenet_dir, tiny_clip):
    model, tokenizer, image_processor = tiny_clip
    splits = images.load_image_dataset(str(tiny_imagenet_dir), max_classes=7, max_eval_samples=21)
    names = splits["validation"].features["label"].names
    lazy = splits["validation"].with_transform(clip.ImageTransform(image_processor))
    templates = clip.TEMPLATES["ensemble"][:3]
    collator = clip.ImageTextCollator(tokenizer, names)
    pixels = collator(batch_of(lazy, range(len(lazy))))["pixel_values"]
    expected = manual_logits(model, tokenizer, names, templates, pixels)
    # prompts in 6 batches of 4
    assert torch.allclose(head_logits(model, tokenizer, names, pixels, templates, batch_size=4), expected, atol=1e-4)
    head = clip.build_zero_shot_classifier(model, tokenizer, names, templates)
    assert head.shape == (7, model.config.projection_dim)
    assert torch.allclose(head.norm(dim=-1), torch.ones(7), atol=1e-5)
    result = clip.evaluate_zero_shot(model, head, names, lazy, collator, batch_size=8)
    labels = np.asarray(splits["validation"]["label"])
    predicted = expected.argmax(-1).numpy()
    assert (result.predictions == predicted).all() and (result.labels == labels).all()
    assert result.metrics["accuracy"] == pytest.approx((predicted == labels).mean())
    top5 = expected.topk(5, dim=-1).indices.numpy()
    assert result.metrics["top5_accuracy"] == pytest.approx((top5 == labels[:, None]).any(1).mean())
    assert result.confusion.sum() == 21 and result.rows.tolist() == list(range(21))
    assert result.scores == pytest.approx(expected.softmax(-1).max(-1).values.numpy(), abs=1e-4)  # best probability
    assert result.metrics["mean_per_class_recall"] == pytest.approx(np.nanmean(result.per_class_recall))


def test_the_zero_shot_head_follows_the_text_tower(tiny_clip, tmp_path):
    """Built anew for every evaluation, the head always reflects the text tower as it is: after a training
    step, an edit of the projection, and with the adapters switched off and on."""
    model, tokenizer, _ = tiny_clip
    names = ["cat", "dog", "school bus", "lemon"]
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = LoRA.apply_lora(model, LORA, task_type=None)
    core = clip.clip_core(model)
    before = head_logits(model, tokenizer, names, pixels)

    def fresh():
        return manual_logits(core, tokenizer, names, clip.TEMPLATES["single"], pixels)

    # an optimizer step on the text tower's adapters (in-place, as training does)
    text_params = [p for n, p in model.named_parameters() if p.requires_grad and "text_model" in n]
    optimizer = torch.optim.SGD(text_params, lr=1.0)
    for p in text_params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    after_step = head_logits(model, tokenizer, names, pixels)
    assert not torch.allclose(after_step, before, atol=1e-4) and torch.allclose(after_step, fresh(), atol=1e-5)
    with torch.no_grad():
        core.text_projection.weight.data.mul_(1.5)
    assert torch.allclose(head_logits(model, tokenizer, names, pixels), fresh(), atol=1e-5)
    # switching the adapters off changes the text features without touching a parameter
    with model.disable_adapter():
        switched_off = head_logits(model, tokenizer, names, pixels)
        assert torch.allclose(switched_off, fresh(), atol=1e-5)
    assert not torch.allclose(head_logits(model, tokenizer, names, pixels), switched_off, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# LoRA for CLIP
# ---------------------------------------------------------------------------------------------

def test_lora_counts_for_vit_b16_built_on_the_meta_device():
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(build_tiny_clip.vit_b_16_config())
    assert LoRA.count_parameters(model)[1] == 149_620_737
    peft_model = LoRA.apply_lora(model, {**LORA, "r": 8, "alpha": 16, "dropout": 0.1}, task_type=None)
    assert LoRA.count_parameters(peft_model) == (491_520, 150_112_257)
    assert not hasattr(peft_model, "classifier") and peft_model.peft_config["default"].task_type is None


@pytest.mark.parametrize("towers, expected", [("vision", 4 * 2 * 2 * 64 * 2), ("text", 4 * 2 * 2 * 64 * 2)])
def test_lora_towers_select_encoders(tiny_clip, towers, expected):
    targets = [f"{towers}_model.q_proj", f"{towers}_model.value"]     # a module name and a role
    model = LoRA.apply_lora(tiny_clip[0], {**LORA, "target_modules": targets}, task_type=None)
    adapted = {name.split(".")[2] for name, p in model.named_parameters() if "lora_" in name}
    assert adapted == {f"{towers}_model"} and LoRA.count_parameters(model)[0] == expected


def randomize_adapters(model, seed=0):
    """LoRA B starts at zero (the adapter is a no-op); give every adapter weight a value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def clip_logits(model, tokenizer, pixels):
    prompts = tokenizer(["a photo of a cat.", "a photo of a dog.", "a photo of a bus."], padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=pixels, **prompts).logits_per_image


def test_adapter_save_load_and_merge_give_identical_logits(tiny_clip_dir, tmp_path):
    model, tokenizer, _ = clip.load_clip(str(tiny_clip_dir))
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    base_logits = clip_logits(model.eval(), tokenizer, pixels)
    adapted = LoRA.apply_lora(model, {**LORA, "modules_to_save": ["visual_projection"]}, task_type=None)
    randomize_adapters(adapted)
    with torch.no_grad():
        adapted.base_model.model.visual_projection.modules_to_save["default"].weight.mul_(-1)
    adapted.eval()
    logits = clip_logits(adapted, tokenizer, pixels)
    assert not torch.allclose(logits, base_logits, atol=1e-3)        # the adapter matters
    LoRA.save_adapter(adapted, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    fresh_base = clip.load_clip(str(tiny_clip_dir))[0]
    loaded = LoRA.load_adapter(fresh_base, tmp_path / "adapter").eval()
    assert torch.allclose(clip_logits(loaded, tokenizer, pixels), logits, atol=1e-6)
    merged = LoRA.merge(loaded)
    assert type(merged).__name__ == "CLIPModel"
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
    assert torch.allclose(clip_logits(merged, tokenizer, pixels), logits, atol=1e-5)


def test_evaluation_runs_without_dropout_and_restores_each_modules_mode(tiny_imagenet_dir, tiny_clip):
    """Evaluations run mid-training (and right after it), with the model in train mode: adapter dropout
    must be off while they score, or the stage's metrics and predictions come from a random forward pass."""
    model, tokenizer, image_processor = tiny_clip
    splits = images.load_image_dataset(str(tiny_imagenet_dir), max_classes=10, max_eval_samples=40)
    names = splits["validation"].features["label"].names
    lazy = splits["validation"].with_transform(clip.ImageTransform(image_processor))
    collator = clip.ImageTextCollator(tokenizer, names)
    adapted = LoRA.apply_lora(model, {**LORA, "dropout": 0.5}, task_type=None)
    randomize_adapters(adapted, seed=2)
    frozen = [name for name, module in adapted.named_modules() if "dropout" in name][:1]

    def evaluate(mode):
        adapted.train(mode)
        adapted.get_submodule(frozen[0]).eval()      # one module left in its own mode by the caller
        head = clip.build_zero_shot_classifier(adapted, tokenizer, names)
        result = clip.evaluate_zero_shot(adapted, head, names, lazy, collator, batch_size=16)
        assert adapted.training is mode and not adapted.get_submodule(frozen[0]).training
        assert all(module.training is mode for name, module in adapted.named_modules() if not name.startswith(frozen[0]))
        return result

    reference = evaluate(False)
    for _ in range(2):
        during_training = evaluate(True)
        assert (during_training.top_k == reference.top_k).all()
        assert during_training.scores == pytest.approx(reference.scores, abs=1e-6)


def test_adapter_load_and_merge_change_the_zero_shot_head(tiny_clip_dir, tmp_path):
    model, tokenizer, _ = clip.load_clip(str(tiny_clip_dir))
    names = ["cat", "dog", "bus"]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    base = head_logits(model, tokenizer, names, pixels)
    adapted = LoRA.apply_lora(clip.load_clip(str(tiny_clip_dir))[0], LORA, task_type=None)
    randomize_adapters(adapted, seed=1)
    LoRA.save_adapter(adapted, tmp_path / "adapter")
    loaded = LoRA.load_adapter(model, tmp_path / "adapter").eval()
    with_adapter = head_logits(loaded, tokenizer, names, pixels)
    assert not torch.allclose(with_adapter, base, atol=1e-3)
    assert torch.allclose(head_logits(LoRA.merge(loaded), tokenizer, names, pixels), with_adapter, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Building the tiny CLIP, and DDP
# ---------------------------------------------------------------------------------------------

def test_build_tiny_cli_makes_a_loadable_clip(tmp_path, clip_tokenizer_dir, capsys):
    folder = tmp_path / "tiny"
    build_tiny_clip.main([str(folder), "image_size=48", f"tokenizer_dir={clip_tokenizer_dir}"])  # `python -m tools.build_tiny_clip ...`
    assert f"model_name={folder}" in capsys.readouterr().out
    model, tokenizer, image_processor = clip.load_clip(str(folder))
    assert type(image_processor).__name__ == "CLIPImageProcessorPil"
    assert model.config.vision_config.image_size == 48
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    pixels = image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48)
    with pytest.raises(LabError, match="usage"):
        build_tiny_clip.main([])
    with pytest.raises(LabError, match="image_size"):
        build_tiny_clip.main([str(tmp_path / "bad"), "image_size=0"])


DDP_WORKER = r"""
import os, sys
import torch, torch.distributed as dist
import losses
rank = int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=rank, world_size=2)
full = torch.load(sys.argv[4], weights_only=True)
rows = slice(0, 3) if rank == 0 else slice(3, 8)         # unequal shares, as after skipped images
image = full["image"][rows].clone().requires_grad_()
text = full["text"][rows].clone().requires_grad_()
loss = losses.clip_loss(image, text, full["scale"])
loss.backward()
torch.save({"loss": loss.detach(), "n": image.shape[0], "image_grad": image.grad, "text_grad": text.grad},
           sys.argv[5] + f"-{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_clip_loss_gathers_features_across_processes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    full = {"image": F.normalize(torch.randn(8, 16, generator=generator), dim=-1),
            "text": F.normalize(torch.randn(8, 16, generator=generator), dim=-1), "scale": torch.tensor(2.0)}
    torch.save(full, tmp_path / "full.pt")
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    processes = [subprocess.Popen([sys.executable, str(worker), str(ROOT), str(rank), str(tmp_path / "store"),
                                   str(tmp_path / "full.pt"), str(tmp_path / "out")],
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}) for rank in range(2)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    outputs = [torch.load(tmp_path / f"out-{rank}.pt", weights_only=True) for rank in range(2)]
    # each process scores its own rows against all 8 pairs: the row-weighted mean is the full-batch loss
    image, text = full["image"].clone().requires_grad_(), full["text"].clone().requires_grad_()
    reference = losses.clip_loss(image, text, full["scale"])
    combined = sum(out["loss"] * out["n"] for out in outputs) / 8
    assert torch.allclose(combined, reference, atol=1e-6)
    # gradients flow through the gather: each process's rows get the gradient of every process's loss
    logits = full["scale"].exp() * image @ text.T
    targets = torch.arange(8)
    per_row = (F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.T, targets, reduction="none")) / 2
    (per_row[:3].mean() + per_row[3:].mean()).backward()
    assert torch.allclose(torch.cat([out["image_grad"] for out in outputs]), image.grad, atol=1e-6)
    assert torch.allclose(torch.cat([out["text_grad"] for out in outputs]), text.grad, atol=1e-6)
