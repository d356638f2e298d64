"""CLIP's image preprocessing for a whole batch in torch: resize, centre crop, rescale, normalise.

`CLIPImageProcessorPil` takes one image at a time through PIL and NumPy float64. `pixel_values` gives
the same `pixel_values` for a list of decoded RGB PIL images at once: images of one size are stacked
and resized together by torch's uint8 antialiased bicubic (PIL's filter, in fixed point like PIL, and
in PIL's order of passes), centre-cropped (zero-padded where too small, as the processor does), then
rescaled and normalised in float32 steps checked to give the processor's values bit for bit.

`preprocessing(image_processor)` reads every setting from the processor once and gives None for any
configuration this module does not reproduce; the caller then runs the processor itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL
import torch
import torch.nn.functional as F

# How far pixel_values may be from CLIPImageProcessorPil's, in normalised units. Torch's uint8 resize
# keeps its filter weights in 16-bit integers where PIL keeps 22 fraction bits in 32, so a resized byte
# can differ from PIL's by a level in each of the two passes: 2 levels, 2 / 255 / 0.2613 (CLIP's smallest
# std) = 0.0300. Nearly every byte is equal, so the mean is far smaller: twice the largest mean seen on
# Tiny ImageNet, grayscale and odd sizes (bench.transform reports it).
MAX_ABS_DIFFERENCE = 0.0301
MEAN_ABS_DIFFERENCE = 0.0002

BICUBIC = 3   # PIL.Image.Resampling.BICUBIC
# Pillow 13 runs the vertical pass first when the height shrinks much more than the width; older
# releases always ran the horizontal pass first. The order changes the result, so other versions fall back.
KNOWN_PILLOW_PASS_ORDER = int(PIL.__version__.split(".")[0]) == 13


@dataclass(frozen=True)
class Preprocessing:
    """A processor's settings, read once."""

    shortest_edge: int | None            # resize so the short side is this long, keeping the aspect ratio
    resize_to: tuple[int, int] | None    # or to this (height, width); neither: no resize
    crop: tuple[int, int] | None         # (height, width) of the centre crop; None: no crop
    divisor: float                       # byte / divisor is the processor's float64 rescale, rounded to float32
    mean: torch.Tensor                   # (1, 3, 1, 1) float32, zeros without normalising
    std: torch.Tensor                    # (1, 3, 1, 1) float32, ones without normalising


def preprocessing(image_processor) -> Preprocessing | None:
    """The processor's settings, or None where `pixel_values` would not reproduce it: another processor
    class (its steps may differ), another filter than bicubic, a size rule other than shortest edge or
    (height, width), padding, neither rescale nor normalise (the processor then returns bytes), a
    rescale or normalise our float32 steps do not match exactly, or a Pillow with another pass order."""
    from transformers import CLIPImageProcessorPil

    p = image_processor
    if type(p) is not CLIPImageProcessorPil or p.do_pad or not (p.do_rescale or p.do_normalize) or not KNOWN_PILLOW_PASS_ORDER:
        return None
    shortest_edge = resize_to = crop = None
    if p.do_resize:
        size = given(p.size)
        if not (isinstance(p.resample, int) and p.resample == BICUBIC):
            return None
        if size.keys() == {"shortest_edge"}:
            shortest_edge = size["shortest_edge"]
        elif size.keys() == {"height", "width"}:
            resize_to = (size["height"], size["width"])
        else:
            return None
    if p.do_center_crop:
        crop_size = given(p.crop_size)
        if "height" not in crop_size or "width" not in crop_size:
            return None
        crop = (crop_size["height"], crop_size["width"])
    sizes = [shortest_edge, *(resize_to or ()), *(crop or ())]
    mean, std = (p.image_mean, p.image_std) if p.do_normalize else (0.0, 1.0)
    if not all(value is None or (isinstance(value, int) and value > 0) for value in sizes) \
            or np.size(mean) not in (1, 3) or np.size(std) not in (1, 3):
        return None
    settings = Preprocessing(shortest_edge, resize_to, crop, float(np.float32(1 / p.rescale_factor)) if p.do_rescale else 1.0,
                             per_channel(mean), per_channel(std))
    every_byte = torch.arange(256, dtype=torch.uint8).expand(1, 3, 1, 256)
    return settings if torch.equal(rescale_normalise(every_byte, settings), processor_values(p)) else None


def given(size) -> dict:
    """The keys of a processor's SizeDict that are set."""
    return {key: value for key, value in dict(size or {}).items() if value is not None}


def per_channel(value) -> torch.Tensor:
    return torch.tensor(np.broadcast_to(np.asarray(value, dtype=np.float32), (3,)).copy()).view(1, 3, 1, 1)


def processor_values(image_processor) -> torch.Tensor:
    """(1, 3, 1, 256): every byte of every channel through the processor's own rescale and normalise."""
    p = image_processor
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()   # channels first, as theirs
    if p.do_rescale:
        values = p.rescale(values, p.rescale_factor)
    if p.do_normalize:
        values = p.normalize(values, p.image_mean, p.image_std)
    return torch.from_numpy(np.ascontiguousarray(values))[None]


def rescale_normalise(batch: torch.Tensor, settings: Preprocessing) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 in the processor's units. Dividing by the float32 divisor rounds as the
    processor's float64 multiply then float32 cast does; multiplying by the factor would not."""
    values = batch.to(torch.float32, memory_format=torch.contiguous_format)
    return values.div_(settings.divisor).sub_(settings.mean).div_(settings.std)


def output_size(height: int, width: int, settings: Preprocessing) -> tuple[int, int]:
    """(height, width) after the resize, as transformers computes it: with a shortest edge, the long
    side is scaled and truncated (get_resize_output_image_size with default_to_square=False)."""
    if settings.shortest_edge is not None:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = settings.shortest_edge, int(settings.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return settings.resize_to or (height, width)


def resize(batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's bicubic resize of a uint8 batch. Torch's two-axis call runs the horizontal pass first, so
    where Pillow runs the vertical one first (its ImagingResampleInner rule), that pass goes alone first."""
    in_height, in_width = batch.shape[-2:]
    if in_height - height > 0 and in_height - height > 2 * (in_width - width):
        batch = F.interpolate(batch, size=(height, in_width), mode="bicubic", antialias=True)
    if tuple(batch.shape[-2:]) != (height, width):     # PIL returns an image already that size unchanged
        batch = F.interpolate(batch, size=(height, width), mode="bicubic", antialias=True)
    return batch


def centre_crop(batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' center_crop: offsets (size - crop) // 2; where the crop is larger than the image,
    the image sits at those (negative) offsets on zeros. Negative padding crops, so one pad does both;
    a crop that fits is a view, with no copy."""
    top, left = (batch.shape[-2] - height) // 2, (batch.shape[-1] - width) // 2
    if top >= 0 and left >= 0:
        return batch[..., top:top + height, left:left + width]
    return F.pad(batch, (-left, left + width - batch.shape[-1], -top, top + height - batch.shape[-2]))


def transform_group(batch: torch.Tensor, settings: Preprocessing) -> torch.Tensor:
    """Resize, crop, rescale and normalise a (N, 3, H, W) uint8 batch of one size -> (N, 3, h, w) float32."""
    batch = resize(batch, *output_size(*batch.shape[-2:], settings))
    if settings.crop is not None:
        batch = centre_crop(batch, *settings.crop)
    return rescale_normalise(batch, settings)


def pixel_values(images: list, settings: Preprocessing) -> torch.Tensor:
    """(N, 3, H, W) float32 `pixel_values` of a non-empty list of decoded RGB PIL images (images.open_rgb),
    as the processor that `settings` came from gives them, within MAX_ABS_DIFFERENCE."""
    by_size = {}
    for index, image in enumerate(images):
        if image.mode != "RGB":
            raise ValueError(f"pixel_values takes RGB images (images.open_rgb), got mode {image.mode}")
        by_size.setdefault(image.size, []).append(index)
    # (N, H, W, 3) viewed as (N, 3, H, W): the channels-last layout torch's uint8 resize is fastest on
    groups = [(indices, transform_group(torch.from_numpy(np.stack([np.asarray(images[i]) for i in indices]))
                                        .permute(0, 3, 1, 2), settings)) for indices in by_size.values()]
    if len(groups) == 1:
        return groups[0][1]
    output = groups[0][1].new_empty((len(images), *groups[0][1].shape[1:]))
    for indices, values in groups:
        output[indices] = values
    return output
