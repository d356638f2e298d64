"""Shared plumbing for the three exercises: config overrides, seeding, run folders, loggers,
text data loading, Hub/offline resolution, and batched feature extraction with an on-disk cache.

Everything here is used by at least two scripts; each exercise keeps its own story.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HUB_HOST = "huggingface.co"
SPLITS = ("train", "validation", "test")


class LabError(Exception):
    """A problem the user can fix (bad config, missing data, offline Hub id): printed, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Config: CONFIG dict at the top of each script, `key=value` overrides on the command line.
# ---------------------------------------------------------------------------------------------

def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_literal(text: str):
    """Value for a key whose default is None: none, bool, int, float, else the string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null", ""):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("nan", "inf", "-inf", "infinity"):
        return text  # a name, not a number: no size or rate is ever meant to be NaN
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_value(text: str, default):
    """Parse `text` to the type of `default` (bool, int, float, str, None, list)."""
    if isinstance(default, bool):
        return _parse_bool(text)
    if isinstance(default, int):
        if text.strip().lower() in ("none", "null"):
            raise ValueError("expected an integer")
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, (list, tuple)):
        items = [item.strip() for item in text.strip().strip("[]").split(",") if item.strip()]
        element_default = default[0] if default else ""
        return [parse_value(item.strip("'\""), element_default) for item in items]
    if default is None:
        return _parse_literal(text)
    return text


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def format_config(config: dict, choices: dict | None = None) -> str:
    choices = choices or {}
    lines = []
    for key, value in _flatten(config).items():
        allowed = f"  # one of {list(choices[key])}" if key in choices else ""
        lines.append(f"  {key}={value!r}{allowed}")
    return "\n".join(lines)


def parse_config(defaults: dict, argv: list[str], choices: dict | None = None,
                 positive: tuple = (), script: str = "script.py") -> dict:
    """Return a deep copy of `defaults` with `key=value` overrides applied and validated.

    Nested sections are addressed with dots (`lora.r=16`). `choices` maps a key to its allowed
    values; keys in `positive` must be > 0 when not None. Raises LabError naming the key.
    `--help` / `-h` prints the config with defaults and exits 0.
    """
    choices = choices or {}
    config = json.loads(json.dumps(defaults))
    flat_defaults = _flatten(defaults)
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"usage: python {script} [key=value ...]\n\nconfig (defaults):\n"
              f"{format_config(defaults, choices)}")
        raise SystemExit(0)
    for arg in argv:
        key, sep, text = arg.partition("=")
        key = key.strip().lstrip("-")
        if not sep:
            raise LabError(f"argument {arg!r} is not key=value; valid keys: {', '.join(flat_defaults)}")
        if key not in flat_defaults:
            raise LabError(f"unknown config key {key!r}; valid keys: {', '.join(flat_defaults)}")
        default = flat_defaults[key]
        try:
            value = parse_value(text, default)
        except ValueError as error:
            kind = type(default).__name__ if default is not None else "value"
            raise LabError(f"bad value {text!r} for {key!r} (a {kind}; default {default!r}): {error}")
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    flat = _flatten(config)
    for key, allowed in choices.items():
        value = flat[key]
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise LabError(f"bad value {value!r} for {key!r}; choose from {list(allowed)}")
    for key in positive:
        value = flat[key]
        values = value if isinstance(value, list) else [value]
        if any(v is not None and not v > 0 for v in values):
            raise LabError(f"{key!r} must be > 0 (or None where allowed), got {value!r}")
    return config


def run_cli(main) -> None:
    """Run `main(argv)` as a script: user errors print one line and exit with code 2; an int that
    `main` returns is the exit status (other return values, like a run folder, mean success)."""
    try:
        status = main(sys.argv[1:])
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    if isinstance(status, int):
        raise SystemExit(status)


# ---------------------------------------------------------------------------------------------
# Reproducibility, devices, timing, environment
# ---------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def trainer_precision(setting: str, device: str) -> str:
    """The Trainer's precision for a `mixed_precision` setting: "no" (fp32), "bf16" or "fp16". Mixed
    precision only on CUDA ("auto": bf16 where the GPU has it, else fp16); bf16 on a CPU is far slower."""
    import torch

    if setting in ("bf16", "fp16") and device != "cuda":
        raise LabError(f"mixed_precision={setting} needs a CUDA GPU; use auto or no on {device}")
    if setting == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device == "cuda" else "no"
    return setting


def trainer_reporters(config: dict) -> list[str]:
    """The Trainer's report_to: tensorboard and/or wandb, as the config turns them on."""
    return [name for name, on in (("tensorboard", config["tensorboard"]),
                                  ("wandb", config["wandb_mode"] != "disabled")) if on]


@contextmanager
def timed(timing: dict, phase: str):
    """Add the seconds spent in the block to timing[phase]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[phase] = round(timing.get(phase, 0.0) + time.perf_counter() - start, 3)


def environment_info() -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for package in ("torch", "transformers", "datasets", "peft", "scikit-learn", "numpy", "wandb"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = best_device()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def shared_dir() -> Path:
    """The read-only assets folder (`LAB_SHARED_DIR`, default `../shared` from the repo root)."""
    return Path(os.environ.get("LAB_SHARED_DIR", Path(__file__).resolve().parent.parent / "shared"))


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------

def prepare_run_dir(output_dir: str, run_name: str | None, exercise: str,
                    overwrite: bool = False, resume: bool = False) -> Path:
    """Create `<output_dir>/<run_name>` and check it is writable.

    A finished or non-empty run folder is never silently mixed with a new run: with `resume` it
    is reused, with `overwrite` it is emptied, otherwise the new run gets a `-2`, `-3`... suffix.
    """
    name = str(run_name) if run_name is not None else f"{exercise}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = Path(output_dir)
    run_dir = base / name
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if overwrite:
            shutil.rmtree(run_dir)
        else:
            suffix = 2
            while (base / f"{name}-{suffix}").exists():
                suffix += 1
            print(f"run folder {run_dir} is not empty; writing this run to {name}-{suffix} "
                  f"(overwrite=True replaces it, resume=True continues it)")
            run_dir = base / f"{name}-{suffix}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise LabError(f"cannot write to output folder {run_dir}: {error.strerror or error}; "
                       f"set output_dir=<a writable folder>")
    return run_dir


def start_trainer_run(config: dict, state, exercise: str) -> tuple[Path, "RunLoggers | None"]:
    """(run folder, loggers) for a Trainer run: the folder is made by the main process and broadcast, so
    every process writes the same one; the loggers (main process only) start the W&B run that the
    Trainer's WandbCallback then logs into, and its TensorBoard callback writes next to ours."""
    from accelerate.utils import broadcast_object_list

    run_dir = [None]
    if state.is_main_process:
        run_dir[0] = prepare_run_dir(config["output_dir"], config["run_name"], exercise, config["overwrite"],
                                     resume=config["resume"])
    if state.num_processes > 1:
        broadcast_object_list(run_dir)
    run_dir = Path(run_dir[0])
    configure_wandb_env(config, run_dir, exercise)  # every process: wandb_mode=online without a key stops all
    if config["tensorboard"]:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return run_dir, RunLoggers(run_dir, config, exercise) if state.is_main_process else None


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint-N folder (the Trainer writes trainer_state.json last)."""
    complete = [path for path in Path(folder).glob("checkpoint-*")
                if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").exists()]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


def largest_across_processes(value: int, device) -> int:
    """The largest of `value` over all DDP processes (the value itself in a single process): how the
    processes agree on a decision, so they all take it at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


class StopOnSignal:
    """SIGINT / SIGTERM while inside `with stop:` (around trainer.train()): the step in flight finishes,
    a checkpoint is saved and training stops, through the Trainer callback `callback()`. A second signal
    gets the usual behaviour (stop at once, without a checkpoint). Under DDP, a signal any process got
    stops them all at the same step, or the checkpoint's collectives would hang."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None        # the signal's number
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be installed there
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        self._restore()

    def _restore(self):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame):
        self.received = number
        print(f"\n{signal.Signals(number).name} received: saving a checkpoint after this step, then stopping "
              f"(send it again to stop at once, without one)", file=sys.stderr, flush=True)
        self._restore()

    def callback(self):
        """The TrainerCallback that stops training; pass it after the Trainer's own flow callback (any
        `callbacks=` entry is), so it can veto what that one schedules."""
        from transformers import TrainerCallback

        stop = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                stop.received = largest_across_processes(stop.received or 0, args.device) or None
                if stop.received:
                    control.should_save = control.should_training_stop = True

            def on_epoch_end(self, args, state, control, **kwargs):
                # The Trainer evaluates and saves at every epoch end, also of an epoch cut short; only a
                # finished epoch may, or a resumed run would track a different best checkpoint.
                if stop.received and state.epoch % 1:
                    control.should_save = control.should_evaluate = False

        return StopCallback()

    def exit(self, step: int, checkpoint: Path | None, run_dir: Path, output_dir: str, announce: bool = True):
        """Say how to continue (when `announce`), then exit with 128 + the signal's number, as shells do."""
        if announce:
            print(f"{signal.Signals(self.received).name}: training stopped at step {step}; checkpoint {checkpoint}. "
                  f"Continue with the same arguments plus resume=True run_name={run_dir.name} "
                  f"output_dir={output_dir}", file=sys.stderr, flush=True)
        raise SystemExit(128 + self.received)


# ---------------------------------------------------------------------------------------------
# Hub ids vs local paths, failing fast when offline
# ---------------------------------------------------------------------------------------------

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


def text_model_source(model_name: str, exercise: str, trust_remote_code: bool = False):
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
    seconds (the libraries' own retries take 30-60 s).
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


# ---------------------------------------------------------------------------------------------
# Loggers: TensorBoard event files and W&B, both inside the run folder
# ---------------------------------------------------------------------------------------------

def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def configure_wandb_env(config: dict, run_dir: Path, exercise: str) -> str:
    """Set W&B's environment so it never prompts and writes inside the run folder.

    Returns the effective mode. `online` without a key is an error before any training starts.
    """
    mode = config["wandb_mode"]
    if mode == "online" and not wandb_has_key():
        raise LabError("wandb_mode='online' but no W&B API key is configured (WANDB_API_KEY or "
                       "`wandb login`); use wandb_mode=offline and `wandb sync` later, or wandb_mode=disabled")
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_DIR"] = str(run_dir)
    os.environ["WANDB_PROJECT"] = config.get("wandb_project") or "transformer-labs"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return mode


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, made on first use and kept in it: a run continued with
    resume=True logs into the same W&B run instead of starting a second one with the same name."""
    path = Path(run_dir) / ".wandb_run_id"
    if not path.exists():
        path.write_text(os.urandom(6).hex())
    return path.read_text().strip()


class RunLoggers:
    """TensorBoard + W&B behind one small interface; either may be off."""

    def __init__(self, run_dir: Path, config: dict, exercise: str):
        self.tensorboard = None
        self.wandb_run = None
        if config.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        if configure_wandb_env(config, run_dir, exercise) != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=os.environ["WANDB_PROJECT"], name=run_dir.name,
                                        id=wandb_run_id(run_dir), resume="allow",
                                        dir=str(run_dir), config=config, job_type=exercise,
                                        reinit="finish_previous")

    def log_metrics(self, metrics: dict, prefix: str = "", step: int = 0) -> None:
        flat = {f"{prefix}{key}": value for key, value in _flatten(metrics).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tensorboard:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key.replace(".", "/"), value, step)
        if self.wandb_run:
            self.wandb_run.log({key.replace(".", "/"): value for key, value in flat.items()}, step=step)

    def log_figure(self, tag: str, figure, step: int = 0) -> None:
        """Log a matplotlib figure to both, then close it (pyplot keeps every open figure alive)."""
        import matplotlib.pyplot as plt

        if self.tensorboard:
            self.tensorboard.add_figure(tag, figure, step, close=False)
        if self.wandb_run:
            import wandb

            self.wandb_run.log({tag: wandb.Image(figure)}, step=step)
        plt.close(figure)

    def log_text(self, tag: str, text: str) -> None:
        if self.tensorboard:
            self.tensorboard.add_text(tag, "```\n" + text + "\n```")
        if self.wandb_run:
            self.wandb_run.summary[tag] = text

    def finish(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb_run:
            self.wandb_run.finish()


# ---------------------------------------------------------------------------------------------
# Text data: Hub id, the original rt-polarity folder, or a folder of CSV/JSON/Parquet splits
# ---------------------------------------------------------------------------------------------

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"),
                 "test": ("test",)}
TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def load_rt_polarity(folder: Path) -> dict:
    """The Hub's rotten_tomatoes splits (8530/1066/1066) from the original latin-1 files.

    Recipe from the HF builder: readlines, strip, keep file order, cut both classes at
    int(n*0.8+0.5) and int(n*0.9+0.5); neg=0, pos=1. Split on "\\n" only: U+0085 is a line
    break to str.splitlines().
    """
    classes = {}
    for name in ("neg", "pos"):
        with open(folder / f"rt-polarity.{name}", encoding="latin-1", newline="\n") as handle:
            classes[name] = [line.strip() for line in handle.readlines()]
    splits = {split: {"text": [], "label": []} for split in SPLITS}
    for label, name in ((1, "pos"), (0, "neg")):
        lines = classes[name]
        cut1, cut2 = int(len(lines) * 0.8 + 0.5), int(len(lines) * 0.9 + 0.5)
        for split, part in zip(SPLITS, (lines[:cut1], lines[cut1:cut2], lines[cut2:])):
            splits[split]["text"] += part
            splits[split]["label"] += [label] * len(part)
    return {"splits": splits, "label_names": ["neg", "pos"]}


def _read_table(path: Path):
    import pandas as pd

    try:
        if path.suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", encoding="utf-8")
        if path.suffix in (".json", ".jsonl"):
            return pd.read_json(path, lines=path.suffix == ".jsonl" or _is_json_lines(path))
        return pd.read_parquet(path)
    except UnicodeDecodeError as error:
        raise LabError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                       f"re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _is_json_lines(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return handle.read(1) != "["


def _find_split_files(folder: Path) -> dict:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            matches = [p for p in sorted(folder.iterdir()) if p.stem == alias and p.suffix in TABLE_SUFFIXES]
            if matches:
                found[split] = matches[0]
                break
    return found


def _labels_to_ids(raw: dict, hub_names: list | None) -> tuple[dict, list[str]]:
    """Map every split's raw labels to ids 0..K-1 and return the class names.

    String labels: sorted unique names from train. Ints 0..K-1 keep their ids (names from the
    Hub's ClassLabel when known); other ints are mapped in sorted order. Validation or test
    labels never seen in train are an error.
    """
    values = set(raw["train"])
    integer = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
    unique = sorted(values) if integer else sorted(values, key=str)
    if integer and unique == list(range(len(unique))):
        names = list(hub_names) if hub_names and len(hub_names) >= len(unique) else [str(v) for v in unique]
        mapping = {v: int(v) for v in unique}
    else:
        names = [str(v) for v in unique]
        mapping = {v: i for i, v in enumerate(unique)}
    ids = {}
    for split, values in raw.items():
        unseen = sorted({str(v) for v in values if v not in mapping})
        if unseen:
            raise LabError(f"labels {unseen[:5]} in the {split} split never occur in train; "
                           f"train has {names}")
        ids[split] = [mapping[v] for v in values]
    return ids, names


def stratified_indices(labels: list[int], size: int | float, seed: int) -> tuple[list, list]:
    """Split indices into (rest, picked) with `size` picked, stratified by label when possible."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    n_pick = size if isinstance(size, int) else int(round(size * len(labels)))
    stratify = labels if counts[counts > 0].min() >= 2 and len(set(labels)) <= n_pick <= len(labels) - len(set(labels)) else None
    rest, picked = train_test_split(indices, test_size=n_pick, random_state=seed, stratify=stratify)
    return sorted(rest.tolist()), sorted(picked.tolist())


def _subsample(split: dict, n: int | None, seed: int, name: str) -> dict:
    total = len(split["label"])
    if n is None or n >= total:
        if n is not None and n > total:
            print(f"max samples {n} > {total} examples in {name}: using all {total}")
        return split
    _, picked = stratified_indices(split["label"], n, seed)
    return {key: [values[i] for i in picked] for key, values in split.items()}


def load_text_dataset(dataset: str, text_column: str = "text", label_column: str = "label",
                      seed: int = 0, max_train_samples: int | None = None,
                      max_eval_samples: int | None = None, validation_fraction: float = 0.1):
    """Load a text classification dataset as a DatasetDict with `text` and `label` (ClassLabel).

    `dataset`: a Hub id, the original rt-polarity folder, or a folder of train/validation/test
    CSV/TSV/JSON(L)/Parquet files (string or int labels, any number of classes). Missing
    validation (and test) splits are carved from train, stratified and seeded. Subsampling is
    stratified and seeded; validation and test share `max_eval_samples`.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    path = Path(dataset).expanduser()
    hub_names = None
    if path.is_dir() and (path / "rt-polarity.pos").exists():
        loaded = load_rt_polarity(path)
        raw, hub_names = loaded["splits"], loaded["label_names"]
    elif path.is_dir() or path.is_file():
        files = _find_split_files(path) if path.is_dir() else {"train": path}
        if "train" not in files:
            raise LabError(f"no train file in {path}: expected train.csv / train.json(l) / train.parquet "
                           f"(and optionally validation.*, test.*)")
        raw = {}
        for split, file in files.items():
            frame = _read_table(file)
            missing = [c for c in (text_column, label_column) if c not in frame.columns]
            if missing:
                raise LabError(f"{file} has no column {missing[0]!r} (columns: {list(frame.columns)}); "
                               f"set text_column= / label_column=")
            raw[split] = {"text": frame[text_column].astype(str).tolist(),
                          "label": frame[label_column].tolist()}
    else:
        raw, hub_names = _load_hub_text(dataset, text_column, label_column)
    for split, columns in raw.items():
        if not columns["text"]:
            raise LabError(f"the {split} split of {dataset} is empty")
    ids, names = _labels_to_ids({split: columns["label"] for split, columns in raw.items()}, hub_names)
    splits = {split: {"text": raw[split]["text"], "label": ids[split]} for split in raw}
    for split in ("test", "validation"):
        if split not in splits:
            rest, carved = stratified_indices(splits["train"]["label"], validation_fraction, seed)
            print(f"{dataset} has no {split} split: carving {len(carved)} examples from train (stratified, seed {seed})")
            train = splits["train"]
            splits[split] = {key: [values[i] for i in carved] for key, values in train.items()}
            splits["train"] = {key: [values[i] for i in rest] for key, values in train.items()}
    splits["train"] = _subsample(splits["train"], max_train_samples, seed, "train")
    for split in ("validation", "test"):
        splits[split] = _subsample(splits[split], max_eval_samples, seed, split)
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict({split: Dataset.from_dict(splits[split], features=features) for split in SPLITS})


def _load_hub_text(dataset: str, text_column: str, label_column: str):
    from datasets import load_dataset

    source = resolve_pretrained(dataset, "dataset", "dataset=<a folder with rt-polarity.pos/.neg or train/validation/test CSV files>")
    loaded = load_dataset(source)
    label_feature = loaded["train"].features.get(label_column)
    hub_names = getattr(label_feature, "names", None)
    raw = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in loaded:
                columns = loaded[alias]
                for column in (text_column, label_column):
                    if column not in columns.column_names:
                        raise LabError(f"{dataset} has no column {column!r} (columns: {columns.column_names})")
                raw[split] = {"text": columns[text_column], "label": columns[label_column]}
                break
    return raw, hub_names


# ---------------------------------------------------------------------------------------------
# Feature extraction from a frozen encoder
# ---------------------------------------------------------------------------------------------

def pool(hidden, attention_mask, pooling: str):
    """(batch, seq, dim) hidden states -> (batch, dim): first token (`cls`) or masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


def pad_batch(sequences: list[list[int]], pad_id: int):
    """Right-pad token id lists to the longest one: (input_ids, attention_mask) tensors."""
    import torch

    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask


# On CPU a batch holds at most this many (padded) tokens: small batches keep their activations in
# cache, about 10% faster than 64 texts of any length on 2 cores (bench/features.py).
CPU_BATCH_TOKENS = 1024


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first: at most `batch_size` items and,
    when given, at most `max_tokens` padded tokens each (a single longer item still gets a batch)."""
    order = np.argsort(lengths, kind="stable")[::-1]
    batches, start = [], 0
    while start < len(order):
        width = max(lengths[order[start]], 1)  # the batch's longest item comes first
        count = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // width))
        batches.append(order[start:start + count])
        start += count
    return batches


def extract_features(model, tokenizer, texts: list[str], pooling: str = "cls", max_length: int = 128,
                     batch_size: int = 64, device: str = "cpu", desc: str = "features") -> np.ndarray:
    """Pooled last-layer features (n, dim) float32, in the order of `texts`.

    Tokenizes once without padding, then runs batches of similar length (sorted, longest first so
    an out-of-memory shows at once) so padding costs almost nothing. On CPU, batches also hold at
    most CPU_BATCH_TOKENS tokens and run in parallel on one worker thread per torch thread, each
    batch single-threaded: one batch's small matmuls and elementwise ops split poorly across cores,
    and single-threaded workers do not stall on each other when the machine is busy.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm.auto import tqdm

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    batches = length_batches([len(ids) for ids in encoded], batch_size, CPU_BATCH_TOKENS if device == "cpu" else None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval().to(device)

    def embed(rows):
        input_ids, attention_mask = pad_batch([encoded[i] for i in rows], pad_id)
        with torch.inference_mode():
            hidden = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
            return rows, pool(hidden, attention_mask.to(device), pooling).float().cpu().numpy()

    threads = torch.get_num_threads()
    workers = min(threads, len(batches)) if device == "cpu" else 1
    features = None
    workers_pool = ThreadPoolExecutor(max(workers, 1))
    progress = tqdm(total=len(batches), desc=desc, unit="batch")
    torch.set_num_threads(1 if workers > 1 else threads)
    try:
        for rows, pooled in workers_pool.map(embed, batches):
            if features is None:
                features = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            features[rows] = pooled
            progress.update()
    finally:
        workers_pool.shutdown(cancel_futures=True)  # an error or Ctrl-C does not wait for the queued batches
        torch.set_num_threads(threads)
        progress.close()
    return features


def model_fingerprint(model_name: str) -> str:
    """Identity of a model for cache keys: the name, plus config and weight file sizes/times if local."""
    path = Path(model_name).expanduser()
    parts = [model_name]
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in (".json", ".safetensors", ".bin"):
                stat = file.stat()
                parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def texts_fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def cached_array(cache_dir: Path, key: dict, compute, name: str = "features") -> tuple[np.ndarray, bool]:
    """Return (array, from_cache). The array is stored as safetensors under a hash of `key`."""
    from safetensors.numpy import load_file, save_file

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{name}-{digest}.safetensors"
    if path.exists():
        return load_file(str(path))[name], True
    array = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({name: np.ascontiguousarray(array)}, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
    tmp.replace(path)
    return array, False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
