"""CLIP's contrastive losses: the symmetric in-batch loss with its gather across processes, and the loss
against every class prompt (exercise 3's `loss=clip` and `loss=class`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import training

MAX_LOGIT_SCALE = 100.0           # CLIP's cap on the learned temperature, exp(logit_scale) <= 100


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows in rank order, and where this process's rows start. Gradients flow
    back to each process's own rows (torch.distributed.nn); processes may hold different counts."""
    import torch.distributed as dist
    import torch.distributed.nn

    size = torch.tensor([len(tensor)], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(tensor, (0, 0, 0, max(sizes) - len(tensor)))
    gathered = torch.distributed.nn.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(gathered, sizes)]), sum(sizes[:dist.get_rank()])


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: image i belongs with text i, every other text in the batch
    is a negative (and vice versa). Embeddings are unit vectors. Under DDP this process's rows are
    scored against the features of all processes."""
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    all_images, all_texts, offset = image_embeds, text_embeds, 0
    if training.is_distributed():
        all_images, offset = gather_with_grad(image_embeds)
        all_texts, _ = gather_with_grad(text_embeds)
    targets = torch.arange(len(image_embeds), device=image_embeds.device) + offset
    image_to_text = scale * image_embeds @ all_texts.T
    text_to_image = scale * text_embeds @ all_images.T
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)) / 2


def class_loss(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor,
               logit_scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each image against every class's text embedding: images of the same class
    in a batch are never each other's negatives."""
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    return F.cross_entropy(scale * image_embeds @ class_embeds.T, labels)
