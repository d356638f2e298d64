"""CLIP only: loading, prompt templates, the lazy image transform, the image-text collator, the
zero-shot head and its evaluation, the contrastive losses and `CLIPTrainer` (exercise 3).

Images are never preprocessed ahead of time: datasets hold file paths (or the Hub's undecoded
bytes) and `with_transform` opens, converts to RGB and preprocesses each batch when it is read,
so nothing image-sized is written to disk.
"""
from __future__ import annotations

import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

import devices
import evaluate
import hub
import images
import losses
import pixels
import training
import zero_shot_metadata
from utils import LabError


# Prompt sets. "single" is CLIP's default; "ensemble" is a small set of our own that suits
# small, low-resolution 64x64 pictures; "imagenet80" is the CLIP authors' 80 ImageNet templates
# (zero_shot_metadata.py). Features are averaged over a set's templates.
TEMPLATES = {
    "single": ("a photo of a {}.",),
    "ensemble": (
        "a photo of a {}.",
        "a low resolution photo of a {}.",
        "a blurry photo of a {}.",
        "a cropped photo of a {}.",
        "a close-up photo of a {}.",
        "a photo of a small {}.",
        "a photo of one {}.",
        "a picture showing a {}.",
    ),
    "imagenet80": zero_shot_metadata.imagenet_templates(),
}


# ---------------------------------------------------------------------------------------------
# Lazy image transform: open, convert to RGB, preprocess - per batch, when read
# ---------------------------------------------------------------------------------------------


def random_augment(image, rng: random.Random):
    """A random horizontal flip and a random crop of 70-100% of each side."""
    from PIL import Image

    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    width, height = image.size
    scale = rng.uniform(0.7, 1.0)
    crop_width, crop_height = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = rng.randint(0, width - crop_width), rng.randint(0, height - crop_height)
    return image.crop((left, top, left + crop_width, top + crop_height))


class ImageTransform:
    """The batch transform for `Dataset.with_transform`: images -> `pixel_values`.

    An unreadable image (corrupt, truncated, not an image) gets `pixel_values=None` and is dropped
    by the collator, which reports it; with `on_bad_image="fail"` it raises a LabError instead.
    With `augment_seed` (training), each image is flipped and cropped at random, drawn from
    (seed, epoch, the image's pixels) alone: no hidden RNG state, so a resumed run sees the same crops,
    and not the file's path, so the same images anywhere on any machine do too.
    """

    def __init__(self, image_processor, on_bad_image: str = "skip", augment_seed: int | None = None):
        self.image_processor = image_processor
        self.batched = pixels.preprocessing(image_processor)   # None: a setting pixels.py does not reproduce
        self.on_bad_image = on_bad_image
        self.augment_seed = augment_seed
        self.epoch = 0          # set by AugmentationEpoch as each training epoch begins
        self.warned = set()

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        pictures, ids = [], []
        for item in batch["image"]:
            ids.append(images.image_id(item))
            try:
                image = images.open_rgb(item)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                if self.on_bad_image == "fail":
                    raise LabError(f"unreadable image {ids[-1]}: {error} (bad_images=skip skips such files)") from None
                if ids[-1] not in self.warned:      # once per file, not once per epoch
                    self.warned.add(ids[-1])
                    print(f"warning: skipping unreadable image {ids[-1]}: {error}", file=sys.stderr)
                image = None
            if image is not None and self.augment_seed is not None:
                image = random_augment(image, random.Random(f"{self.augment_seed}:{self.epoch}:{images.pixel_digest(image)}"))
            pictures.append(image)
        readable = [image for image in pictures if image is not None]
        processed = iter((pixels.pixel_values(readable, self.batched) if self.batched else
                          self.image_processor(images=readable, return_tensors="pt")["pixel_values"]) if readable else [])
        return {"pixel_values": [next(processed) if image is not None else None for image in pictures],
                "label": batch["label"], "image_id": ids}


# ---------------------------------------------------------------------------------------------
# Collator: pixel values + the tokens of each image's class prompt
# ---------------------------------------------------------------------------------------------


def text_max_length(model) -> int:
    return clip_core(model).config.text_config.max_position_embeddings


class ImageTextCollator:
    """Stack a batch of transformed images and pair each with its class prompt.

    Output: `pixel_values` (B, 3, H, W), `input_ids` / `attention_mask` (B, L) of each image's
    prompt (`template` filled with its class name, tokenized once for all classes), `labels` (B,),
    `kept` (which input rows were readable) and, when some were not, `skipped_images`. When no image of
    the batch is readable, B is 0: evaluate_zero_shot skips such a batch and CLIPTrainer trains nothing on it.
    """

    def __init__(self, tokenizer, class_names: list[str], template: str = TEMPLATES["single"][0], max_length: int = 77):
        encoded = tokenizer([template.format(name) for name in class_names], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        self.class_input_ids = encoded["input_ids"]
        self.class_attention_mask = encoded["attention_mask"]

    def __call__(self, features: list[dict]) -> dict:
        kept = [f["pixel_values"] is not None for f in features]
        good = [f for f, ok in zip(features, kept) if ok]
        labels = torch.tensor([int(f["label"]) for f in good], dtype=torch.long)
        attention_mask = self.class_attention_mask[labels]
        width = int(attention_mask.sum(1).max()) if good else 1   # trim the padding no prompt here needs
        batch = {"pixel_values": torch.stack([f["pixel_values"] for f in good]) if good else torch.zeros(0, 3, 0, 0),
                 "input_ids": self.class_input_ids[labels, :width], "attention_mask": attention_mask[:, :width],
                 "labels": labels, "kept": torch.tensor(kept)}
        skipped = [f["image_id"] for f, ok in zip(features, kept) if not ok]
        if skipped:
            batch["skipped_images"] = skipped
        return batch


# ---------------------------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------------------------


def clip_core(model):
    """The CLIPModel inside DDP and PEFT wrappers (PEFT's adapters live inside its modules)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def eval_mode(model):
    """`model` in eval mode inside the block (dropout off, LoRA's adapter dropout too), every module's own mode
    restored after: evaluations run in the middle of training, and a forward pass with dropout is a random one."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in modes:
            module.training = was_training


def build_zero_shot_classifier(model, tokenizer, class_names: list[str], templates=TEMPLATES["single"],
                               batch_size: int = 256, precision: str = "no") -> torch.Tensor:
    """The zero-shot head: (num_classes, dim) unit text features, one per class. Every (template, class)
    prompt is encoded in batches, each feature normalised, averaged over templates and renormalised.

    Stateless, as open_clip's `build_zero_shot_classifier`: it is built anew for every evaluation, from
    the text tower as it is then (trained, adapters loaded or merged), so no feature is ever stale. Its
    cost, one text-tower pass over the prompts, is paid once per evaluation, not once per batch."""
    core = clip_core(model)
    device = next(core.parameters()).device
    prompts = [template.format(name) for template in templates for name in class_names]
    features = []
    with torch.inference_mode(), eval_mode(core), devices.autocast(device.type, precision):
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size], padding=True, truncation=True,
                               max_length=text_max_length(core), return_tensors="pt").to(device)
            text = core.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            features.append(F.normalize(text.pooler_output.float(), dim=-1))
    per_template = torch.cat(features).view(len(templates), len(class_names), -1)
    return F.normalize(per_template.mean(0), dim=-1)


def zero_shot_logits(model, pixel_values: torch.Tensor, classifier: torch.Tensor, precision: str = "no") -> torch.Tensor:
    """(batch, num_classes) scaled cosine similarities of images against the zero-shot head; the image tower
    runs in `precision` (devices.precision), the similarities in fp32."""
    core = clip_core(model)
    pixel_values = pixel_values.to(classifier.device, non_blocking=True)
    with devices.autocast(classifier.device.type, precision):
        image = core.get_image_features(pixel_values=pixel_values).pooler_output
    return core.logit_scale.exp().float() * F.normalize(image.float(), dim=-1) @ classifier.T


@dataclass
class ZeroShotResult:
    metrics: dict                   # accuracy, top5_accuracy, macro/weighted P/R/F1, mean_per_class_recall
    labels: np.ndarray              # (n,) true class of each readable image
    top_k: np.ndarray               # (n, k) best classes, best first
    rows: np.ndarray                # (n,) dataset row of each readable image
    confusion: np.ndarray
    per_class_recall: np.ndarray
    most_confused: list
    skipped_images: list = field(default_factory=list)
    seconds: float = 0.0
    scores: np.ndarray | None = None  # (n,) softmax probability of the best class (over the scaled cosines)

    @property
    def predictions(self) -> np.ndarray:
        return self.top_k[:, 0]

    @property
    def images_per_second(self) -> float:
        return round(len(self.labels) / self.seconds, 1) if self.seconds else float("nan")


def zero_shot_metrics(labels, top_k, label_names: list[str]) -> tuple[dict, np.ndarray, np.ndarray, list]:
    """(metrics, confusion matrix, per-class recall, most-confused pairs) from true labels and
    each image's top-5 class ids (best first). Only these ids are kept, never all logits."""
    labels, top_k = np.asarray(labels), np.asarray(top_k)
    predictions = top_k[:, 0]
    metrics = evaluate.classification_metrics(labels, predictions)
    # named top-5 whatever k is: with fewer than 5 classes it counts all of them
    metrics["top5_accuracy"] = float((top_k == labels[:, None]).any(axis=1).mean())
    matrix = evaluate.confusion(labels, predictions, len(label_names))
    recall = evaluate.per_class_recall(matrix)
    metrics["mean_per_class_recall"] = float(np.nanmean(recall))
    return metrics, matrix, recall, evaluate.most_confused_pairs(matrix, label_names, top=10)


def share_loader(dataset, collator, batch_size: int, num_workers: int, device_type: str, generator=None):
    """(this process's share of the rows, a DataLoader over it in row order): how every evaluation outside the
    Trainer reads its images, each process its share under torchrun (training.process_share)."""
    from torch.utils.data import DataLoader, Subset

    share = training.process_share(len(dataset))
    return share, DataLoader(Subset(dataset, share), batch_size=batch_size, shuffle=False, collate_fn=collator,
                             num_workers=num_workers, pin_memory=devices.pin_memory(device_type), generator=generator)


def evaluate_zero_shot(model, classifier: torch.Tensor, class_names: list[str], dataset, collator, batch_size: int = 64,
                       num_workers: int = 0, desc: str = "zero-shot", top_k: int = 5,
                       split: str = "validation", precision: str = "no") -> ZeroShotResult:
    """Classify every image of a transformed dataset against a zero-shot head (one row per class name).
    It runs in eval mode (no dropout) and in `precision`, and leaves every module in the mode it found it.
    Memory is bounded by one batch: per image only its label, top-k class ids and best probability are kept.
    Under torchrun each process scores its share of the images and every process gets the whole result.
    A batch with no readable image is skipped (its images counted); a `split` with none at all is a LabError."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    share, loader = share_loader(dataset, collator, batch_size, num_workers, classifier.device.type)
    k = min(top_k, len(classifier))
    # each list starts with an empty array so that a share with no readable image still concatenates
    labels, rows, skipped = [np.empty(0, np.int64)], [np.empty(0, np.int64)], []
    best, scores = [np.empty((0, k), np.int64)], [np.empty(0, np.float32)]
    start = time.perf_counter()
    offset = share.start
    with torch.inference_mode(), eval_mode(model):
        for batch in tqdm(loader, desc=desc, unit="batch"):
            skipped += batch.get("skipped_images", [])
            if len(batch["labels"]):
                logits = zero_shot_logits(model, batch["pixel_values"], classifier, precision)
                top, probability = evaluate.top_classes(logits, k)
                best.append(top)
                scores.append(probability)
                labels.append(batch["labels"].numpy())
                rows.append(offset + np.flatnonzero(batch["kept"].numpy()))
            offset += len(batch["kept"])
    seconds = time.perf_counter() - start
    # the shares in rank order are the rows in order; the slowest process's time is the evaluation's
    shares = gather_object([{"labels": np.concatenate(labels), "top_k": np.concatenate(best),
                             "scores": np.concatenate(scores), "rows": np.concatenate(rows),
                             "skipped": skipped, "seconds": seconds}])
    joined = {name: np.concatenate([share[name] for share in shares]) for name in ("labels", "top_k", "scores", "rows")}
    skipped = [path for share in shares for path in share["skipped"]]
    if not len(joined["labels"]):
        raise LabError(f"every image of the {split} split is unreadable ({len(dataset)} images, e.g. "
                       f"{skipped[0] if skipped else '-'}); nothing can be scored: check the image files")
    metrics, matrix, recall, pairs = zero_shot_metrics(joined["labels"], joined["top_k"], class_names)
    return ZeroShotResult(metrics, joined["labels"], joined["top_k"], joined["rows"], matrix, recall, pairs, skipped,
                          max(share["seconds"] for share in shares), joined["scores"])


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class CLIPTrainer(training.LabTrainer):
    """Trainer for a CLIPModel (plain or with PEFT adapters); `processing_class` is its tokenizer.

    loss="clip": the symmetric in-batch contrastive loss (each image's own class prompt as its text).
    loss="class": each image against all class prompts (tokens from the collator), so same-class
    images are not false negatives. Evaluation is zero-shot classification of `class_names` with
    `templates`, its head built anew from the text tower as training has left it: ZeroShotEvaluation runs it
    wherever the Trainer's schedule (eval_strategy, eval_steps) asks for an evaluation.
    """

    def __init__(self, *args, class_names: list[str], templates=TEMPLATES["single"], loss: str = "clip", **kwargs):
        super().__init__(*args, **kwargs)
        if loss not in ("clip", "class"):
            raise LabError(f"loss must be 'clip' or 'class', got {loss!r}")
        self.loss, self.class_names, self.templates = loss, list(class_names), tuple(templates)
        self.skipped_images = set()
        self.images_trained = 0           # readable training images seen, to refuse a split with none
        self.add_callback(ZeroShotEvaluation(self))   # last, so it sees what every other callback asked for

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.skipped_images.update(inputs.get("skipped_images", []))
        self.images_trained += len(inputs["labels"])
        if not len(inputs["labels"]):
            return self._empty_batch_loss(model, inputs, return_outputs)
        return self._loss(model, inputs, return_outputs)

    def _loss(self, model, inputs, return_outputs):
        if self.loss == "class":
            device = inputs["pixel_values"].device
            text = {"input_ids": self.data_collator.class_input_ids.to(device),
                    "attention_mask": self.data_collator.class_attention_mask.to(device)}
        else:
            text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        # one forward through the (possibly DDP-wrapped) model, so gradient sync hooks run
        outputs = model(pixel_values=inputs["pixel_values"], **text)
        logit_scale = clip_core(model).logit_scale
        if self.loss == "class":
            loss = losses.class_loss(outputs.image_embeds, outputs.text_embeds, inputs["labels"], logit_scale)
        else:
            loss = losses.clip_loss(outputs.image_embeds, outputs.text_embeds, logit_scale)
        training.check_loss(loss, self.state.global_step + 1)     # before backward: a bad step changes nothing
        return (loss, outputs) if return_outputs else loss

    def _empty_batch_loss(self, model, inputs, return_outputs):
        """A batch whose every image was unreadable: one blank image through the model, times zero. The
        forward keeps DDP's gradient hooks and the feature gather in step across processes; the loss and
        every gradient are 0 (the scheduler still counts the step)."""
        core = clip_core(model)
        size = core.config.vision_config.image_size
        device = inputs["labels"].device
        inputs = {**inputs, "pixel_values": torch.zeros(1, 3, size, size, device=device),
                  "input_ids": self.data_collator.class_input_ids[:1].to(device),
                  "attention_mask": self.data_collator.class_attention_mask[:1].to(device),
                  "labels": torch.zeros(1, dtype=torch.long, device=device)}
        loss, outputs = self._loss(model, inputs, return_outputs=True)
        return (loss * 0.0, outputs) if return_outputs else loss * 0.0

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if not training.largest_across_processes(self.images_trained, self.args.device) and self.skipped_images:
            raise LabError(f"every image of the train split read in training was unreadable "
                           f"({len(self.skipped_images)} images, e.g. {sorted(self.skipped_images)[0]}); "
                           f"nothing was learned: check the image files")
        return output

    def zero_shot_evaluation(self) -> dict:
        """Zero-shot classification of the eval set with a head built from the text tower as it is now; its
        metrics (eval_accuracy, ...) are logged at the current step, and returned."""
        precision = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "no"   # as training computes
        classifier = build_zero_shot_classifier(self.model, self.processing_class, self.class_names, self.templates,
                                                precision=precision)
        result = evaluate_zero_shot(self.model, classifier, self.class_names, self.eval_dataset, self.data_collator,
                                    self.args.per_device_eval_batch_size, self.args.dataloader_num_workers,
                                    desc=f"zero-shot eval (step {self.state.global_step})", precision=precision)
        metrics = {f"eval_{name}": value for name, value in result.metrics.items()}
        metrics["eval_images_per_second"] = result.images_per_second
        self.log(metrics)
        return metrics


class ZeroShotEvaluation(TrainerCallback):
    """Where the Trainer's schedule asks for an evaluation (eval_strategy, eval_steps, as the other callbacks such
    as StopOnSignal's leave it), runs the CLIPTrainer's zero-shot evaluation instead and withdraws the request: the
    Trainer's own would put the model through its generic prediction loop, which knows no class prompts."""

    def __init__(self, trainer: CLIPTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            control.should_evaluate = False
            self.trainer.zero_shot_evaluation()

    on_epoch_end = on_step_end


class AugmentationEpoch(TrainerCallback):
    """Tells the training ImageTransform which epoch begins (also when resuming mid-epoch), before
    the epoch's data loader starts: new crops every epoch, the same ones in every run."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.epoch = int(state.epoch + 1e-6)


# ---------------------------------------------------------------------------------------------
# Loading a CLIP
# ---------------------------------------------------------------------------------------------


def load_clip(model_name: str, trust_remote_code: bool = False):
    """(CLIPModel, tokenizer, image processor) from a Hub id or a local folder.

    The image processor is the PIL one (no torchvision needed), configured from the checkpoint.
    """
    from transformers import AutoConfig, CLIPImageProcessorPil, CLIPModel

    source = hub.resolve_pretrained(model_name, "model", "model_name=<a local CLIP folder>, e.g. one made by "
                                      "`python -m tools.build_tiny_clip models/tiny-clip`")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise LabError(f"{model_name} has no usable model config: {error}") from None
    if config.model_type != "clip":
        raise LabError(f"{model_name} is a {config.model_type} model; exercise 3 needs a CLIP model with image and "
                       f"text towers, e.g. openai/clip-vit-base-patch16 or a folder from `python -m tools.build_tiny_clip`")
    tokenizer = hub.load_tokenizer(source, trust_remote_code)
    try:
        image_processor = CLIPImageProcessorPil.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise LabError(f"no image processor (preprocessor_config.json) in {model_name}: {error}") from None
    model = CLIPModel.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, tokenizer, image_processor

