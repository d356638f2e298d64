"""Random-weight CLIP fixtures for offline runs: a tiny model for tests and demos, ViT-B/16's shape for benches.

    python -m tools.build_tiny_clip models/tiny-clip                     # real CLIP tokenizer, 32 px
    python -m tools.build_tiny_clip models/tiny-clip image_size=64 hidden_size=128
"""
from __future__ import annotations

from pathlib import Path

import torch

import utils
from tools import assets
from utils import LabError


TOKENIZER_DIR = "models/clip-tokenizer"    # inside the shared assets folder


TINY_CLIP = {
    "tokenizer_dir": None,      # None = <shared>/models/clip-tokenizer (the real CLIP vocabulary)
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "intermediate_size": 128,
    "layers": 2,
    "heads": 2,
    "projection_dim": 64,
    "seed": 0,
}


def vit_b_16_config(vocab_size: int = 49408):
    """The architecture of openai/clip-vit-base-patch16 (149,620,737 parameters): random weights in this
    shape cost what the real model costs (bench/zeroshot.py) and count like it (LoRA accounting)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
                     "vocab_size": vocab_size, "max_position_embeddings": 77},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                       "num_hidden_layers": 12, "image_size": 224, "patch_size": 16},
        projection_dim=512)


def build_tiny_clip(folder: Path, **overrides) -> Path:
    """Save a small random-weight CLIPModel with the real CLIP tokenizer and a PIL image
    processor for `image_size` inputs to `folder`, loadable as model_name=<folder>."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    spec = {**TINY_CLIP, **overrides}
    tokenizer_dir = Path(spec["tokenizer_dir"] or assets.shared_dir() / TOKENIZER_DIR)
    if not (tokenizer_dir / "vocab.json").exists() or not (tokenizer_dir / "merges.txt").exists():
        raise LabError(f"no CLIP tokenizer files (vocab.json, merges.txt) in {tokenizer_dir}; "
                       f"set LAB_SHARED_DIR or tokenizer_dir=<folder>")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    size = spec["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tower = {"hidden_size": spec["hidden_size"], "intermediate_size": spec["intermediate_size"],
             "num_hidden_layers": spec["layers"], "num_attention_heads": spec["heads"]}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**tower, "image_size": size, "patch_size": spec["patch_size"]},
        projection_dim=spec["projection_dim"])
    torch.manual_seed(spec["seed"])
    folder = Path(folder)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def main(argv: list[str]) -> None:
    """`python -m tools.build_tiny_clip <folder> [key=value ...]` (keys: see TINY_CLIP)."""
    usage = "python -m tools.build_tiny_clip <folder> [" + " ".join(f"{k}={v}" for k, v in TINY_CLIP.items()) + "]"
    positive = tuple(k for k in TINY_CLIP if k not in ("tokenizer_dir", "seed"))
    if not argv or "=" in argv[0] or argv[0] in ("-h", "--help"):
        utils.parse_config(TINY_CLIP, argv, positive=positive, script="-m tools.build_tiny_clip <folder>")  # --help
        raise LabError(f"usage: {usage}")
    spec = utils.parse_config(TINY_CLIP, argv[1:], positive=positive, script="-m tools.build_tiny_clip <folder>")
    folder = build_tiny_clip(Path(argv[0]), **spec)
    print(f"tiny random-weight CLIP ({spec['image_size']} px images) saved to {folder}; use model_name={folder}")

if __name__ == "__main__":
    utils.run_cli(main)
