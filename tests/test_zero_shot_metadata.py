"""zero_shot_metadata.py: the CLIP authors' class names and prompt templates shipped in class_names/."""
from __future__ import annotations

import re
import string

import pytest

import images
import zero_shot_metadata as zsm

# wnid -> (WordNet's first synonym, the CLIP authors' name)
KNOWN = {
    "n02124075": ("Egyptian cat", "Egyptian Mau"),
    "n02509815": ("lesser panda", "red panda"),
    "n03126707": ("crane", "construction crane"),
    "n09428293": ("seashore", "beach"),
    "n04008634": ("projectile", "missile"),
    "n02977058": ("cash machine", "automated teller machine"),
    "n04067472": ("reel", "fishing casting reel"),
    "n07749582": ("lemon", "lemon"),
    "n01443537": ("goldfish", "goldfish"),
}


def normalised(name: str) -> str:
    return re.sub(r"\s+", " ", name).strip().lower()


def test_clip_class_names_cover_the_shipped_wordnet_ids_in_order():
    names = zsm.clip_class_names()
    assert len(names) == 200
    assert list(names) == list(images.shipped_wordnet_words())
    assert all(isinstance(n, str) and n == n.strip() and n for n in names.values())
    assert len({normalised(n) for n in names.values()}) == 200


def test_clip_class_names_keys_are_the_release_wnids(tiny_imagenet_dir):
    wnids = (tiny_imagenet_dir / "wnids.txt").read_text(encoding="utf-8").split()
    assert list(zsm.clip_class_names()) == wnids


def test_known_mappings():
    names, words = zsm.clip_class_names(), images.shipped_wordnet_words()
    for wnid, (wordnet_first, clip_name) in KNOWN.items():
        assert words[wnid].split(",")[0].strip() == wordnet_first
        assert names[wnid] == clip_name


def test_clip_class_names_is_a_fresh_dict():
    zsm.clip_class_names()["n02124075"] = "changed"
    assert zsm.clip_class_names()["n02124075"] == "Egyptian Mau"


def test_imagenet_templates_shape():
    templates = zsm.imagenet_templates()
    assert isinstance(templates, tuple) and len(templates) == 80 == len(set(templates))
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    for template in templates:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        assert fields == [""], template
        assert template.format("tench").count("tench") == 1


@pytest.mark.parametrize("path", [zsm.CLIP_CLASS_NAMES, zsm.IMAGENET_TEMPLATES])
def test_each_file_cites_its_source(path):
    text = zsm.source(path)
    assert "open_clip" in text and "openai/CLIP" in text
    assert re.search(r"\b[0-9a-f]{40}\b", text)


def test_class_names_clip_is_the_default_where_the_ids_are_known(tiny_imagenet_dir):
    import clip
    import exercise_3

    assert exercise_3.CONFIG["class_names"] == "clip"
    names = images.load_image_dataset(str(tiny_imagenet_dir), max_classes=3, class_names="clip")["train"]
    assert names.features["label"].names == ["Egyptian Mau", "fishing casting reel", "volleyball"]
    # folder names that are no WordNet id keep their own names beside CLIP's
    assert images.readable_class_names(["tabby_cat", "n02124075"], "clip", None) == ["tabby cat", "Egyptian Mau"]
    assert len(clip.TEMPLATES["imagenet80"]) == 80 and clip.TEMPLATES["imagenet80"] == zsm.imagenet_templates()
