"""pixels.py against CLIPImageProcessorPil: real Tiny ImageNet images, grayscale and odd sizes, at ViT-B/16's
224 px settings and the tiny CLIP's 32 px ones; settings it does not reproduce fall back to the processor."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

import clip
import images
import pixels
from tools.build_tiny_clip import TINY_CLIP

TINY = TINY_CLIP["image_size"]
PROCESSORS = {
    # openai/clip-vit-base-patch16's preprocessor_config.json: CLIPImageProcessorPil's defaults, written out
    "vit-b-16": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                     image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
    "tiny-clip": dict(size={"shortest_edge": TINY}, crop_size={"height": TINY, "width": TINY}),    # as build_tiny_clip
    # a fixed (height, width) resize and a crop larger than it: the crop pads with zeros
    "padded-crop": dict(size={"height": 40, "width": 56}, crop_size={"height": 48, "width": 50}),
}
# (width, height): downsampled tall and wide (the tall ones take Pillow's vertical pass first), upsampled, exact
ODD_SIZES = [(300, 517), (517, 300), (130, 700), (260, 900), (41, 23), (23, 90), (224, 224), (TINY, TINY)]


def tiny_imagenet(folder, n: int = 48) -> list:
    return [images.open_rgb(path) for path in sorted((folder / "val" / "images").glob("*.JPEG"))[:n]]


def odd_images(folder, tmp_path) -> list:
    """Tiny ImageNet pictures resized to odd shapes, plus grayscale JPEGs as exercise 3 opens them."""
    pictures = tiny_imagenet(folder, len(ODD_SIZES) + 3)
    resized = [picture.resize(size, Image.BICUBIC) for picture, size in zip(pictures, ODD_SIZES)]
    for index, picture in enumerate(pictures[len(ODD_SIZES):]):
        picture.convert("L").resize((64 + 9 * index, 64)).save(tmp_path / f"gray{index}.jpg")
    grays = [images.open_rgb(str(path)) for path in sorted(tmp_path.glob("gray*.jpg"))]
    assert {Image.open(path).mode for path in tmp_path.glob("gray*.jpg")} == {"L"}
    return resized + grays


def differences(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    difference = (ours - theirs).abs()
    return difference.max().item(), difference.mean().item()


def within_tolerance(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    largest, mean = differences(ours, theirs)
    return largest <= pixels.MAX_ABS_DIFFERENCE and mean <= pixels.MEAN_ABS_DIFFERENCE


@pytest.mark.parametrize("name", PROCESSORS)
def test_matches_the_processor_on_tiny_imagenet(name, tiny_imagenet_dir):
    processor = CLIPImageProcessorPil(**PROCESSORS[name])
    settings = pixels.preprocessing(processor)
    assert settings is not None
    pictures = tiny_imagenet(tiny_imagenet_dir)
    theirs = processor(images=pictures, return_tensors="pt")["pixel_values"]
    assert within_tolerance(pixels.pixel_values(pictures, settings), theirs)


@pytest.mark.parametrize("name", PROCESSORS)
def test_matches_the_processor_on_grayscale_and_odd_sizes(name, tiny_imagenet_dir, tmp_path):
    processor = CLIPImageProcessorPil(**PROCESSORS[name])
    pictures = odd_images(tiny_imagenet_dir, tmp_path)
    ours = pixels.pixel_values(pictures, pixels.preprocessing(processor))
    theirs = processor(images=pictures, return_tensors="pt")["pixel_values"]
    assert within_tolerance(ours, theirs)
    for row, picture in enumerate(pictures):            # each image alone too: the bound holds per image
        assert differences(ours[row], theirs[row])[0] <= pixels.MAX_ABS_DIFFERENCE, picture.size


def test_the_tolerance_catches_a_wrong_setting(tiny_imagenet_dir):
    processor = CLIPImageProcessorPil(**PROCESSORS["vit-b-16"])
    settings = pixels.preprocessing(processor)
    pictures = tiny_imagenet(tiny_imagenet_dir, 8)
    theirs = processor(images=pictures, return_tensors="pt")["pixel_values"]
    off_mean = dataclasses.replace(settings, mean=settings.mean + 0.01)     # 2.6 levels on every pixel
    assert not within_tolerance(pixels.pixel_values(pictures, off_mean), theirs)
    bilinear = CLIPImageProcessorPil(**{**PROCESSORS["vit-b-16"], "resample": 2})
    assert not within_tolerance(pixels.pixel_values(pictures, settings),
                                bilinear(images=pictures, return_tensors="pt")["pixel_values"])


class SubclassedProcessor(CLIPImageProcessorPil):
    pass


def test_other_processor_classes_fall_back():
    assert pixels.preprocessing(SubclassedProcessor(**PROCESSORS["tiny-clip"])) is None   # may override a step
    assert clip.ImageTransform(lambda images, return_tensors: None).batched is None


@pytest.mark.parametrize("change", [
    {"resample": 2},                                              # bilinear
    {"size": {"shortest_edge": 224, "longest_edge": 300}},
    {"do_pad": True, "pad_size": {"height": 256, "width": 256}},
    {"do_rescale": False, "do_normalize": False},                 # the processor returns bytes
    {"image_mean": [0.5, 0.5]},                                   # not one value per channel
])
def test_settings_it_does_not_reproduce_fall_back(change, tiny_imagenet_dir):
    processor = CLIPImageProcessorPil(**{**PROCESSORS["tiny-clip"], **change})
    assert pixels.preprocessing(processor) is None
    if "image_mean" not in change:                                # the processor itself refuses that one
        paths = [str(path) for path in sorted((tiny_imagenet_dir / "val" / "images").glob("*.JPEG"))[:3]]
        batch = clip.ImageTransform(processor)({"image": paths, "label": [0, 1, 2]})
        theirs = processor(images=[images.open_rgb(path) for path in paths], return_tensors="pt")["pixel_values"]
        assert torch.equal(torch.stack(batch["pixel_values"]), theirs)    # the stock path, bit for bit


def test_image_transform_uses_it_and_keeps_bad_images_and_ids(tiny_imagenet_dir, tmp_path):
    processor = CLIPImageProcessorPil(**PROCESSORS["tiny-clip"])
    transform = clip.ImageTransform(processor)
    assert transform.batched is not None
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [str(path) for path in sorted((tiny_imagenet_dir / "val" / "images").glob("*.JPEG"))[:4]]
    items = [paths[0], str(broken), *paths[1:]]
    batch = transform({"image": items, "label": [0, 1, 2, 3, 4]})
    assert batch["image_id"] == items and batch["label"] == [0, 1, 2, 3, 4]
    assert [value is None for value in batch["pixel_values"]] == [False, True, False, False, False]
    theirs = processor(images=[images.open_rgb(path) for path in paths], return_tensors="pt")["pixel_values"]
    assert within_tolerance(torch.stack([value for value in batch["pixel_values"] if value is not None]), theirs)


def test_augmented_crops_of_many_sizes_match(tiny_imagenet_dir):
    processor = CLIPImageProcessorPil(**PROCESSORS["vit-b-16"])
    paths = [str(path) for path in sorted((tiny_imagenet_dir / "val" / "images").glob("*.JPEG"))[:12]]
    assert len({clip.random_augment(images.open_rgb(path), random.Random(path)).size for path in paths}) > 1
    stock = clip.ImageTransform(processor, augment_seed=0)
    stock.batched = None                                # the same crops through the processor
    ours, theirs = (torch.stack(transform({"image": paths, "label": [0] * 12})["pixel_values"])
                    for transform in (clip.ImageTransform(processor, augment_seed=0), stock))
    assert within_tolerance(ours, theirs)

