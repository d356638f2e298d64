"""Exercise 3's input pipeline: the batched torch preprocessing (pixels.py) against the stock per-image
CLIPImageProcessorPil, and the whole lazy pipeline against the image tower it feeds.

At ViT-B/16's preprocessing (224 px shortest edge, 224 px centre crop, CLIP's mean and std; with --model,
that CLIP folder's), on Tiny ImageNet validation files:

1. **Per core**: images/s of the stock path (decode each JPEG with images.open_rgb, then the processor on
   each batch, which works image by image in PIL and NumPy, as clip.ImageTransform did) and of the
   batched one (the same decoding, then pixels.pixel_values), each with decoding and on decoded images
   alone. Both sides run on one torch thread (PIL uses one) in alternating rounds; `speedup` is the
   median round's ratio with decoding, the goal >= 2. Their pixel values must agree within
   pixels.MAX_ABS_DIFFERENCE / MEAN_ABS_DIFFERENCE.
2. **The pipeline**: a `datasets` Dataset of paths `.with_transform(clip.ImageTransform(...))` read by a
   torch DataLoader (batch 32) with 0, 1 and 2 workers, worker start-up included (each epoch pays it).
3. **The consumer**: ViT-B/16's image tower (random weights, fp32, every torch thread) on batches of 32;
   `pipeline_over_forward` is the fastest pipeline's images/s over the tower's: above 1, decoding and
   preprocessing keep up with the model on this machine.

    python -m bench.transform                 # 1024 images (the tower's forward pass takes much of it)
    python -m bench.transform --images 320
    python -m bench.transform --smoke         # a few seconds
"""
from __future__ import annotations

from bench import common
from bench.zeroshot import validation_images

common.offline_env()
from tools import build_tiny_clip  # noqa: E402
import clip  # noqa: E402
import images  # noqa: E402
import pixels  # noqa: E402
import torch  # noqa: E402

WORKER_COUNTS = (0, 1, 2)
TARGETS = {"speedup": 2.0}


def stock(batches, processor) -> None:
    """The processor on each batch, as clip.ImageTransform called it. Timed passes keep no results, as a
    pipeline hands each batch on: holding 1,000 images' pixels would time the memory, not the work."""
    for batch in batches:
        processor(images=batch, return_tensors="pt")


def batched(batches, settings) -> None:
    for batch in batches:
        pixels.pixel_values(batch, settings)


def differences(batches, processor, settings) -> tuple[float, float]:
    """Max and mean |ours - theirs| over every pixel value, one batch at a time."""
    largest = total = count = 0
    for batch in batches:
        difference = (pixels.pixel_values(batch, settings) - processor(images=batch, return_tensors="pt")["pixel_values"]).abs()
        largest, total, count = max(largest, difference.max().item()), total + difference.sum().item(), count + difference.numel()
    return largest, total / count


def decoded(path_batches) -> list:
    return [[images.open_rgb(path) for path in batch] for batch in path_batches]


def on_one_thread(function):
    """`function` run on one torch thread: per core, the same as the single-threaded PIL side."""
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function()
        finally:
            torch.set_num_threads(threads)
    return run


def pipeline_images_per_s(dataset, processor, batch_size: int, workers: int) -> float:
    """Images/s of the lazy dataset read through a DataLoader, worker start-up included."""
    from torch.utils.data import DataLoader

    lazy = dataset.with_transform(clip.ImageTransform(processor))
    loader = DataLoader(lazy, batch_size=batch_size, num_workers=workers,
                        collate_fn=lambda rows: torch.stack([row["pixel_values"] for row in rows]))
    count, seconds = common.timed(lambda: sum(len(batch) for batch in loader))
    return count / seconds


def forward_images_per_s(batch_size: int, batches: int) -> float:
    """ViT-B/16's image tower and projection (random weights, fp32) on random 224 px batches. The warm-up
    is one image: a batch of 32 takes half a minute on 2 cores, next to which set-up costs are noise."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(build_tiny_clip.vit_b_16_config()).eval()
    pixel_batch = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        model.get_image_features(pixel_values=pixel_batch[:1])
        _, seconds = common.timed(lambda: [model.get_image_features(pixel_values=pixel_batch) for _ in range(batches)])
    return batch_size * batches / seconds


def main() -> None:
    from transformers import CLIPImageProcessorPil

    parser = common.parser(__doc__, "tiny-imagenet-200", "CLIP folder whose image processor to measure (default: "
                           "ViT-B/16's, CLIPImageProcessorPil's defaults); the tower is ViT-B/16's either way")
    parser.add_argument("--images", type=int, default=1024, help="validation images")
    parser.add_argument("--batch-size", type=int, default=32, help="images per transform call, DataLoader and forward batch")
    parser.add_argument("--forward-batches", type=int, default=1, help="timed batches of the image tower")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of the per-core comparison")
    args = common.parse_args(parser, "tiny run: 16 images, batches of 4, one round")
    if args.smoke:
        args.images, args.batch_size, args.forward_batches, args.repeats = 16, 4, 1, 1

    processor = CLIPImageProcessorPil.from_pretrained(args.model) if args.model else CLIPImageProcessorPil()
    settings = pixels.preprocessing(processor)
    if settings is None:
        raise SystemExit(f"pixels.py does not reproduce the image processor of {args.model}: nothing to compare")
    dataset = validation_images(args.dataset, args.images)
    paths = list(dataset["image"])
    path_batches = [paths[start:start + args.batch_size] for start in range(0, len(paths), args.batch_size)]
    pictures = decoded(path_batches)            # also warms the file cache for every timed pass

    with_decoding, _, _ = common.paired_rounds(
        on_one_thread(lambda: batched(decoded(path_batches), settings)),
        on_one_thread(lambda: stock(decoded(path_batches), processor)), args.repeats)
    alone, _, _ = common.paired_rounds(on_one_thread(lambda: batched(pictures, settings)),
                                       on_one_thread(lambda: stock(pictures, processor)), args.repeats)
    n = len(paths)
    speedup = common.median(r["theirs_s"] / r["ours_s"] for r in with_decoding)
    pipeline = {workers: round(pipeline_images_per_s(dataset, processor, args.batch_size, workers), 1)
                for workers in WORKER_COUNTS}
    forward = forward_images_per_s(args.batch_size, args.forward_batches)
    ratios = {"speedup": round(speedup, 2),
              "transform_speedup": round(common.median(r["theirs_s"] / r["ours_s"] for r in alone), 2),
              "pipeline_over_forward": common.significant(max(pipeline.values()) / forward)}
    largest, mean = differences(pictures, processor, settings)
    common.emit({
        "bench": "transform", "model": args.model or "ViT-B/16 224 px preprocessing", "images": n, "batch_size": args.batch_size,
        "rounds": args.repeats,
        "stock_images_per_s": round(common.median(n / r["theirs_s"] for r in with_decoding), 1),
        "batched_images_per_s": round(common.median(n / r["ours_s"] for r in with_decoding), 1),
        "stock_transform_images_per_s": round(common.median(n / r["theirs_s"] for r in alone), 1),
        "batched_transform_images_per_s": round(common.median(n / r["ours_s"] for r in alone), 1),
        "pipeline_images_per_s_by_workers": pipeline, "forward_images_per_s": round(forward, 1),
        "max_abs_difference": round(largest, 5), "mean_abs_difference": float(f"{mean:.3g}"),
        "tolerance": {"max_abs": pixels.MAX_ABS_DIFFERENCE, "mean_abs": pixels.MEAN_ABS_DIFFERENCE},
        "within_tolerance": largest <= pixels.MAX_ABS_DIFFERENCE and mean <= pixels.MEAN_ABS_DIFFERENCE,
        **ratios, "ratios": list(ratios), "targets": TARGETS,   # bench/table.py's rows
        "met": speedup >= TARGETS["speedup"],
    }, args.results_file)


if __name__ == "__main__":
    main()
