"""GPU check: each exercise's own GPU work, on its default architecture with random weights, for a bounded number
of steps; per exercise the precision used, input rate against model rate, peak GPU memory, and whether the model
waited on its input.

    python -m tools.gpu_check                # on a machine with a CUDA GPU (make gpu-check)
    python -m tools.gpu_check --cpu --tiny   # the same code on the CPU with tiny models (what the tests run)

Nothing is downloaded: the models are DistilBERT's and CLIP ViT-B/16's architectures with random weights (their
speed and memory are the real models'), the texts and images are made up, the tokenizer is a small WordPiece.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import devices

WORDS = ("film story actor scene plot funny dull moving script music camera light long short great bad "
         "director ending character drama comedy").split()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device == "cuda" else None


def made_up_texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 60))) for _ in range(count)]


def wordpiece_tokenizer():
    from transformers import DistilBertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return DistilBertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def distilbert_config(tiny: bool, vocab_size: int):
    from transformers import DistilBertConfig

    sizes = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64} if tiny else {}   # else distilbert-base
    return DistilBertConfig(vocab_size=vocab_size, **sizes)


def check_exercise_1(device: str, precision: str, tiny: bool, texts: int) -> dict:
    """Feature extraction (exercise_1.extract_features): tokenizing is the input, the encoder the model."""
    from transformers import DistilBertModel

    import exercise_1

    tokenizer = wordpiece_tokenizer()
    model = DistilBertModel(distilbert_config(tiny, len(tokenizer))).to(device)
    sample = made_up_texts(texts)
    exercise_1.extract_features(model, tokenizer, sample[:64], device=device, precision=precision, desc="warm-up")
    start = time.perf_counter()
    tokenizer(sample, truncation=True, max_length=128)
    tokenizing = time.perf_counter() - start
    synchronize(device)
    start = time.perf_counter()
    exercise_1.extract_features(model, tokenizer, sample, device=device, precision=precision, desc="features")
    synchronize(device)
    total = time.perf_counter() - start
    model_rate = len(sample) / max(total - tokenizing, 1e-9)
    return {"exercise": "exercise_1 extraction", "unit": "texts/s", "input_per_s": len(sample) / tokenizing,
            "model_per_s": model_rate, "end_to_end_per_s": len(sample) / total}


def check_exercise_2(device: str, precision: str, tiny: bool, steps: int) -> dict:
    """Fine-tuning steps through the Trainer, as exercise 2 builds them; the collator's padding is the input."""
    from datasets import Dataset
    from transformers import DistilBertForSequenceClassification, TrainingArguments

    import exercise_2
    import training

    tokenizer = wordpiece_tokenizer()
    model = DistilBertForSequenceClassification(distilbert_config(tiny, len(tokenizer)))
    rows = 16 * steps
    encoded = tokenizer(made_up_texts(rows), truncation=True, max_length=128)
    dataset = Dataset.from_dict({**encoded, "labels": [i % 2 for i in range(rows)]})
    collator = exercise_2.make_collator(tokenizer, device)
    start = time.perf_counter()
    for first in range(0, rows, 16):
        collator([dataset[i] for i in range(first, first + 16)])
    input_rate = rows / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, max_steps=steps, per_device_train_batch_size=16, report_to="none",
                                 bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
                                 dataloader_pin_memory=devices.pin_memory(device), save_strategy="no",
                                 disable_tqdm=True, logging_strategy="no")
        output = training.LabTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    rate = output.metrics["train_samples_per_second"]
    return {"exercise": "exercise_2 fine-tuning", "unit": "samples/s", "input_per_s": input_rate,
            "model_per_s": None, "end_to_end_per_s": rate}


def made_up_images(folder: Path, count: int, size: int = 64) -> list[str]:
    """JPEGs of noise, Tiny ImageNet's size: decoding them costs what decoding photos costs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def check_exercise_3(device: str, precision: str, tiny: bool, count: int, batch_size: int) -> dict:
    """Zero-shot evaluation (clip.evaluate_zero_shot): decoding and transforming images is the input, the image
    tower the model. The head is random unit vectors: its one text pass per evaluation is not what is checked."""
    from datasets import ClassLabel, Dataset, Features, Value
    from torch.utils.data import DataLoader
    from transformers import CLIPImageProcessorPil, CLIPModel

    import clip
    from tools import build_tiny_clip

    config = build_tiny_clip.vit_b_16_config()
    if tiny:
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        config.vision_config.update({**tower, "patch_size": 32})
        config.text_config.update(tower)
    model = CLIPModel(config).to(device).eval()
    size = config.vision_config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    workers = devices.loader_workers("auto", device)
    names = [f"class {i}" for i in range(200)]
    classifier = torch.nn.functional.normalize(torch.randn(200, config.projection_dim, device=device), dim=-1)
    with tempfile.TemporaryDirectory() as folder:
        paths = made_up_images(Path(folder), count)
        features = Features({"image": Value("string"), "label": ClassLabel(names=names)})
        dataset = Dataset.from_dict({"image": paths, "label": [i % 200 for i in range(count)]}, features=features)
        lazy = dataset.with_transform(clip.ImageTransform(processor))
        collator = clip.ImageTextCollator(wordpiece_tokenizer(), names)
        start = time.perf_counter()
        batches = list(DataLoader(lazy, batch_size=batch_size, collate_fn=collator, num_workers=workers))
        input_rate = count / (time.perf_counter() - start)
        pixels = batches[0]["pixel_values"]
        clip.zero_shot_logits(model, pixels, classifier, precision)        # warm-up
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(len(batches)):
                clip.zero_shot_logits(model, pixels, classifier, precision)
        synchronize(device)
        model_rate = len(batches) * len(pixels) / (time.perf_counter() - start)
        result = clip.evaluate_zero_shot(model, classifier, names, lazy, collator, batch_size, workers,
                                         desc="zero-shot", precision=precision)
    return {"exercise": "exercise_3 zero-shot", "unit": "images/s", "input_per_s": input_rate,
            "model_per_s": model_rate, "end_to_end_per_s": result.images_per_second, "workers": workers}


def report(result: dict, precision: str, device: str) -> str:
    rate = lambda value: "-" if value is None else f"{value:,.0f}"
    model, end_to_end = result["model_per_s"], result["end_to_end_per_s"]
    waited = "-" if model is None else ("yes" if end_to_end < 0.9 * model else "no")
    memory = peak_memory_mb(device)
    return (f"{result['exercise']:<24} precision {precision:<4}  input {rate(result['input_per_s'])} "
            f"{result['unit']}, model {rate(model)}, end to end {rate(end_to_end)}; "
            f"peak GPU memory {'-' if memory is None else f'{memory:,.0f} MB'}; model waited on input: {waited}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (to test this script)")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the default architectures")
    parser.add_argument("--steps", type=int, default=20, help="training steps of exercise 2")
    parser.add_argument("--texts", type=int, default=4096, help="texts for exercise 1's extraction")
    parser.add_argument("--images", type=int, default=2048, help="images for exercise 3's zero-shot evaluation")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch in exercise 3")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
              f"nothing to check")
        return 0
    device = "cpu" if args.cpu else "cuda"
    precision = devices.precision("auto", device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cuda":
        print(f"gpu-check on {torch.cuda.get_device_name(0)} (compute capability "
              f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))}), torch {torch.__version__}")
    checks = (lambda: check_exercise_1(device, precision, args.tiny, args.texts),
              lambda: check_exercise_2(device, precision, args.tiny, args.steps),
              lambda: check_exercise_3(device, precision, args.tiny, args.images, args.batch_size))
    for check in checks:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        print(report(check(), precision, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
