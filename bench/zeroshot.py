"""Exercise 3's zero-shot evaluation (class text features encoded once, reused for every batch) vs
encoding all 200 class prompts again for every batch of images, as a naive lab loop does.

Both sides score the same Tiny ImageNet validation images with the same random-weight CLIP (the real
CLIP tokenizer) and must pick the same top-1 classes. Images are decoded once up front so the ratio
measures the model work (median of `--repeats` alternating rounds); the end-to-end ratio, with JPEG
decoding in the loop (identical on both sides), is printed too.

No cache can beat `ceiling_speedup` = 1 + (encoding all class prompts) / (one batch of images): how
much caching buys depends on the text tower's cost next to the image tower's, so the bench runs either
`build_tiny_clip.build_tiny_clip`'s defaults or ViT-B/16's architecture (exercise 3's default model, random
weights: the same cost per image and per prompt as the real one).

    python -m bench.zeroshot                          # tiny CLIP, all 10,000 validation images, 200 classes
    python -m bench.zeroshot --architecture vit-b-16 --images 128 --repeats 1   # minutes on a CPU
    python -m bench.zeroshot --prompts ensemble       # 8 templates per class
    python -m bench.zeroshot --smoke                  # a few seconds
"""
from __future__ import annotations

import tempfile

import numpy as np

from bench import common

common.offline_env()
from tools import assets, build_tiny_clip  # noqa: E402
import LoRA  # noqa: E402
import images  # noqa: E402
import clip  # noqa: E402
import exercise_3  # noqa: E402
import torch  # noqa: E402


def reencoding_predictions(model, tokenizer, class_names, templates, dataset, collator, batch_size) -> np.ndarray:
    """The naive loop: every batch, tokenize and encode every class prompt again, then score the images."""
    from torch.utils.data import DataLoader

    predictions = []
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            classifier = clip.build_zero_shot_classifier(model, tokenizer, class_names, templates)  # every batch
            logits = clip.zero_shot_logits(model, batch["pixel_values"], classifier)
            predictions.append(logits.argmax(dim=-1).numpy())
    return np.concatenate(predictions)


def cached_predictions(model, tokenizer, class_names, templates, dataset, collator, batch_size) -> np.ndarray:
    """Exercise 3's evaluation: the zero-shot head built once per evaluation, then clip.evaluate_zero_shot."""
    classifier = clip.build_zero_shot_classifier(model, tokenizer, class_names, templates)
    return clip.evaluate_zero_shot(model, classifier, class_names, dataset, collator, batch_size=batch_size,
                                   desc="bench zero-shot").predictions


ARCHITECTURES = {"tiny": "build_tiny_clip.build_tiny_clip()", "vit-b-16": "ViT-B/16 shape, random"}


def add_architecture_argument(parser) -> None:
    parser.add_argument("--architecture", default="tiny", choices=tuple(ARCHITECTURES),
                        help="the random CLIP when no --model: build_tiny_clip.build_tiny_clip's defaults or ViT-B/16's shape")


def load_bench_clip(model_name: str | None, architecture: str):
    """(model in eval mode, tokenizer, image processor, what the model is): `model_name`'s CLIP, or a
    fresh seeded random one of `architecture` (the zero-shot benches' model)."""
    if model_name:
        model, tokenizer, image_processor = clip.load_clip(model_name)
    elif architecture == "vit-b-16":
        model, tokenizer, image_processor = random_vit_b_16()
    else:
        with tempfile.TemporaryDirectory() as scratch:
            model, tokenizer, image_processor = clip.load_clip(str(build_tiny_clip.build_tiny_clip(f"{scratch}/tiny-clip")))
    return model.eval(), tokenizer, image_processor, model_name or ARCHITECTURES[architecture]


def validation_images(dataset: str, n: int):
    """The first `n` validation images of the seeded selection, as exercise 3 loads them (file paths, labels)."""
    return images.load_image_dataset(dataset, seed=0, max_train_samples=400, max_eval_samples=n)["validation"]


def random_vit_b_16():
    """(model, tokenizer, image processor): ViT-B/16's architecture with seeded random weights, the real
    CLIP tokenizer and 224 px preprocessing (CLIPImageProcessor's defaults)."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(assets.shared_dir() / build_tiny_clip.TOKENIZER_DIR), model_max_length=77)
    torch.manual_seed(0)
    return CLIPModel(build_tiny_clip.vit_b_16_config(len(tokenizer))), tokenizer, CLIPImageProcessorPil()


def main() -> None:
    parser = common.parser(__doc__, "tiny-imagenet-200", "CLIP folder (default: a fresh random one, see --architecture)")
    add_architecture_argument(parser)
    parser.add_argument("--images", type=int, default=10000, help="validation images (Tiny ImageNet has 10,000)")
    parser.add_argument("--batch-size", type=int, default=exercise_3.CONFIG["eval_batch_size"])
    parser.add_argument("--prompts", default=exercise_3.CONFIG["prompts"], choices=tuple(clip.TEMPLATES),
                        help="prompt set; 'ensemble' has 8 templates, so re-encoding costs 8x more")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both sides; the median round counts")
    args = common.parse_args(parser, "tiny run: 16 images, one round")
    n = 16 if args.smoke else args.images
    args.repeats = 1 if args.smoke else args.repeats

    model, tokenizer, image_processor, model_description = load_bench_clip(args.model, args.architecture)
    validation = validation_images(args.dataset, n)
    class_names = validation.features["label"].names
    collator = clip.ImageTextCollator(tokenizer, class_names)
    lazy = validation.with_transform(clip.ImageTransform(image_processor))
    decoded = [lazy[i] for i in range(len(lazy))]  # every image opened and preprocessed once, kept in memory

    templates = clip.TEMPLATES[args.prompts]
    common_args = (model, tokenizer, class_names, templates)
    cached_predictions(*common_args, decoded[:args.batch_size], collator, args.batch_size)  # warm-up
    rounds, ours, theirs = common.paired_rounds(
        lambda: cached_predictions(*common_args, decoded, collator, args.batch_size),
        lambda: reencoding_predictions(*common_args, decoded, collator, args.batch_size), args.repeats)
    end_to_end, _, _ = common.paired_rounds(
        lambda: cached_predictions(*common_args, lazy, collator, args.batch_size),
        lambda: reencoding_predictions(*common_args, lazy, collator, args.batch_size), 1)
    speedup = common.median(r["theirs_s"] / r["ours_s"] for r in rounds)
    ours_s = common.median(r["ours_s"] for r in rounds)
    batches = -(-len(decoded) // args.batch_size)
    _, encode_s = common.timed(lambda: clip.build_zero_shot_classifier(model, tokenizer, class_names, templates))
    common.emit({
        "bench": "zeroshot", "images": len(decoded),
        "model": model_description,
        "classes": len(class_names), "prompts": args.prompts, "templates": len(templates), "batch_size": args.batch_size,
        "rounds": len(rounds), "parameters": LoRA.count_parameters(model)[1],
        "same_predictions": bool((ours == theirs).all()),
        "cached_images_per_s": round(len(decoded) / ours_s, 1),
        "reencode_images_per_s": round(common.median(len(decoded) / r["theirs_s"] for r in rounds), 1),
        "speedup": round(speedup, 2),
        # why the ratio is what it is: one encoding of all class prompts vs one batch of images
        "class_prompts_encode_ms": round(1000 * encode_s, 1), "cached_batch_ms": round(1000 * ours_s / batches, 1),
        "ceiling_speedup": round(1 + encode_s / (ours_s / batches), 2),
        "end_to_end_speedup": round(end_to_end[0]["theirs_s"] / end_to_end[0]["ours_s"], 2),
        "targets": {"speedup": 10.0}, "met": speedup >= 10.0,
    }, args.results_file)


if __name__ == "__main__":
    main()
