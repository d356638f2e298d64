"""Class names and prompt templates for zero-shot classification, as data: the CLIP authors' curated
ImageNet names for Tiny ImageNet's 200 WordNet ids and their 80 ImageNet prompt templates.

Both ship with the project in `class_names/` (nothing is downloaded), each file with a "source" naming the
repositories, paths and commits it was taken from and how it was mapped:

- `tiny_imagenet_clip.json`: wnid -> name, from the names OpenAI published with CLIP
  (`notebooks/Prompt_Engineering_for_ImageNet.ipynb`, copied into open_clip as `IMAGENET_CLASSNAMES`),
  e.g. n02124075 "Egyptian Mau" where WordNet's first synonym is "Egyptian cat";
- `imagenet_templates.json`: the 80 templates (open_clip's `OPENAI_IMAGENET_TEMPLATES`), each a
  `str.format` string with one `{}` for the class name, as clip.py's TEMPLATES are.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

CLASS_NAMES_DIR = Path(__file__).resolve().parent / "class_names"
CLIP_CLASS_NAMES = CLASS_NAMES_DIR / "tiny_imagenet_clip.json"
IMAGENET_TEMPLATES = CLASS_NAMES_DIR / "imagenet_templates.json"


@lru_cache(maxsize=None)
def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def clip_class_names() -> dict[str, str]:
    """wnid -> the CLIP authors' ImageNet class name, for Tiny ImageNet's 200 classes, in the order of its
    wnids.txt (CLIP_CLASS_NAMES). A new dict on every call: the caller may change it."""
    return dict(_read(CLIP_CLASS_NAMES)["names"])


def imagenet_templates() -> tuple[str, ...]:
    """The CLIP authors' 80 ImageNet prompt templates, in their published order, each with one `{}`
    for the class name (IMAGENET_TEMPLATES): `template.format(name)`."""
    return tuple(_read(IMAGENET_TEMPLATES)["templates"])


def source(path: Path) -> str:
    """Where the data in one of these files comes from (its "source" field)."""
    return _read(Path(path))["source"]
