"""Hub ids or local folders: resolve either to something loadable now, fail fast offline, load tokenizers.

Every model and dataset name in the configs passes through `resolve_pretrained`, so an unreachable
Hub is one line naming the id and the offline route, within seconds.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from utils import LabError


HUB_HOST = "huggingface.co"


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """AutoTokenizer, refusing a local folder without tokenizer files: transformers 5 would
    otherwise build an empty tokenizer there and turn every word into [UNK] without a word."""
    from transformers import AutoTokenizer

    path = Path(source)
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
        raise LabError(f"no usable tokenizer in {source}: none of {', '.join(TOKENIZER_FILES)} found; "
                       f"save one there with tokenizer.save_pretrained(<folder>)")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise LabError(f"no usable tokenizer in {source}: {error}") from None


def usable_max_length(max_length: int, tokenizer, model_config=None) -> int:
    """`max_length` capped at what the model takes: its tokenizer's `model_max_length` and its config's
    `max_position_embeddings` (a tokenizer saved without a limit reports ~1e30). Longer inputs would index
    past the position embeddings. Says so on stderr when it caps."""
    limits = [getattr(tokenizer, "model_max_length", None), getattr(model_config, "max_position_embeddings", None)]
    limit = min((value for value in limits if isinstance(value, int) and 0 < value < 10 ** 9), default=None)
    if limit is None or max_length <= limit:
        return max_length
    print(f"note: max_length={max_length} is more than the model takes; using {limit} tokens", file=sys.stderr)
    return limit


def text_source_and_tokenizer(model_name: str, exercise: str, trust_remote_code: bool = False):
    """(loadable source, tokenizer) for a text model, refusing vision/multimodal checkpoints."""
    from transformers import AutoConfig

    source = resolve_pretrained(model_name, "model", "model_name=<a local model folder>")
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if hasattr(config, "vision_config") or getattr(config, "model_type", "") in ("vit", "clip", "siglip"):
        raise LabError(f"{model_name} is a {config.model_type} (vision) model; {exercise} needs a text "
                       f"encoder such as distilbert-base-uncased")
    return source, load_tokenizer(source, trust_remote_code)


def hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(name: str, repo_type: str = "model", offline_hint: str = "") -> str:
    """Return a local folder or a Hub id that can be loaded now.

    Local folders are used as they are. A Hub id is returned when the Hub answers, or its cached
    snapshot when it does not; otherwise a LabError names the id and the offline route within
    seconds, without waiting out the libraries' own retries.
    """
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LabError(f"{repo_type} path {name!r} does not exist")
    if hub_reachable():
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, repo_type=repo_type, local_files_only=True)
    except Exception:
        raise LabError(
            f"cannot fetch {repo_type} {name!r}: the Hugging Face Hub is unreachable and it is not in "
            f"the local cache. Point the config at a local copy instead ({offline_hint or 'a local folder'}); "
            f"the README's offline quick start shows the command.") from None
