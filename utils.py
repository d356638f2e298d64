"""Plumbing for every script: config and CLI, seeding and devices, run folders, atomic writes.

Nothing here knows about models, data or training (hub.py, data.py, training.py) or loggers (loggers.py).
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import faults


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
        value = float(text)
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if isinstance(default, (list, tuple)):
        items = [item.strip() for item in text.strip().strip("[]").split(",") if item.strip()]
        # a list of one type parses each element as that type; one of several (e.g. [1, 2, "all"]) as a literal
        element_default = ("" if not default else default[0] if all(type(v) is type(default[0]) for v in default)
                           else None)
        return [parse_value(item.strip("'\""), element_default) for item in items]
    if default is None:
        return _parse_literal(text)
    return text


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_comments(script: Path) -> dict:
    """{flat key: the comment beside it} in a script's CONFIG dict: the one source of each key's description.
    A comment on a line of its own just before a nested dict describes that section."""
    import io
    import tokenize

    tokens = list(tokenize.generate_tokens(io.StringIO(Path(script).read_text(encoding="utf-8")).readline))
    start = next((i for i, token in enumerate(tokens) if token.string == "CONFIG" and token.start[1] == 0), None)
    if start is None:
        return {}
    start = next(i for i in range(start, len(tokens)) if tokens[i].string == "{")
    comments, sections, pending, name, key = {}, [], "", None, None
    depth, brackets = 1, 0          # dict nesting inside CONFIG; list/tuple nesting inside a value
    for token in tokens[start + 1:]:
        if token.type == tokenize.OP and token.string in "[(":
            brackets += 1
        elif token.type == tokenize.OP and token.string in "])":
            brackets -= 1
        elif token.type == tokenize.OP and token.string == "{":
            depth += 1
            sections.append(name)
            if pending:
                comments[key] = pending
        elif token.type == tokenize.OP and token.string == "}":
            depth -= 1
            sections = sections[:depth - 1]
            if depth == 0:
                break
        elif token.type == tokenize.STRING and brackets == 0:
            name = token.string.strip("\"'")
        elif token.type == tokenize.OP and token.string == ":" and brackets == 0:
            key = ".".join([*sections, name])
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if token.line.strip().startswith("#"):
                pending = text
            elif key is not None:
                comments.setdefault(key, text)
    return comments


def format_config(config: dict, choices: dict | None = None, comments: dict | None = None) -> str:
    """Every key with its default, what it does (`comments`) and its allowed values."""
    choices, comments = choices or {}, comments or {}
    flat = flatten(config)
    width = max((len(f"{key}={value!r}") for key, value in flat.items()), default=0)
    lines = []
    for key, value in flat.items():
        section = key.rpartition(".")[0]
        if section and section in comments and not any(line.startswith(f"  {section}.") for line in lines):
            lines.append(f"  # {section}: {comments[section]}")
        described = " # ".join(part for part in (comments.get(key), f"one of {list(choices[key])}" if key in choices
                                                  else None) if part)
        lines.append(f"  {f'{key}={value!r}'.ljust(width)}  # {described}" if described else f"  {key}={value!r}")
    return "\n".join(lines)


def parse_config(defaults: dict, argv: list[str], choices: dict | None = None,
                 positive: tuple = (), script: str = "script.py", *, non_negative: tuple = (),
                 fractions: tuple = (), integers: tuple = ()) -> dict:
    """Return a deep copy of `defaults` with `key=value` overrides applied and validated.

    Nested sections are addressed with dots (`lora.r=16`). `choices` maps a key to its allowed
    values; keys in `positive` must be > 0, in `non_negative` >= 0, in `fractions` in [0, 1), each
    when not None (for a list, each element); keys in `integers` (those whose default is None) must be
    whole numbers. Floats are finite, and `seed` is in numpy's range. Raises LabError naming the key.
    `--help` / `-h` prints the config with defaults and exits 0.
    """
    choices = choices or {}
    config = json.loads(json.dumps(defaults))
    flat_defaults = flatten(defaults)
    if any(arg in ("-h", "--help") for arg in argv):
        source = Path(script)
        comments = config_comments(source) if source.is_file() else {}
        print(f"usage: python {source.name if source.is_file() else script} [key=value ...]\n\n"
              f"config (defaults):\n{format_config(defaults, choices, comments)}")
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
        _set(config, key, value)
    flat = flatten(config)
    for key, allowed in choices.items():
        value = flat[key]
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise LabError(f"bad value {value!r} for {key!r}; choose from {list(allowed)}")
    rules = ((positive, "> 0", lambda v: v > 0), (non_negative, ">= 0", lambda v: v >= 0),
             (fractions, "in [0, 1)", lambda v: 0 <= v < 1), (integers, "", lambda v: True),
             (("seed",) if "seed" in flat else (), f"in [0, {2 ** 32 - 1}]", lambda v: 0 <= v < 2 ** 32))
    for keys, rule, test in rules:
        for key in keys:
            _check_number(config, key, flat[key], flat_defaults[key] is None, key in integers, rule, test)
    return config


def _check_number(config: dict, key: str, value, may_be_none: bool, whole: bool, rule: str, test) -> None:
    """One range rule for one key (each element of a list); a whole number given as 1e3 becomes 1000."""
    values = [v for v in (value if isinstance(value, list) else [value]) if v is not None]
    if value == []:
        raise LabError(f"bad value [] for {key!r}: expected one or more numbers {rule}".rstrip())
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
           or (whole and v != int(v)) for v in values):
        raise LabError(f"bad value {value!r} for {key!r}: expected a{' whole' if whole else ''} number"
                       f"{' ' + rule if rule else ''}{' or none' if may_be_none else ''}")
    if not all(test(v) for v in values):
        raise LabError(f"{key!r} must be {rule}{' (or None)' if may_be_none else ''}, got {value!r}")
    if whole and isinstance(value, float):
        _set(config, key, int(value))


def _set(config: dict, key: str, value) -> None:
    """config[a][b] = value for the dotted key `a.b`."""
    *parents, leaf = key.split(".")
    for parent in parents:
        config = config[parent]
    config[leaf] = value


def run_cli(main) -> None:
    """Run `main(argv)` as a script: user errors print one line and exit with code 2; an int that
    `main` returns is the exit status (other return values, like a run folder, mean success)."""
    # SIGTERM as an exception, as Ctrl-C is: the run unwinds through its stages (faults.stage) and cleans up
    previous = signal.signal(signal.SIGTERM, faults.raise_interrupted)
    try:
        status = main(sys.argv[1:])
    except (LabError, faults.WriteError) as error:    # a write outside any stage left nothing half-written either
        faults.end_progress_bars()
        message = error if isinstance(error, LabError) else faults.write_fault(error, "nothing half-written was left")
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt as interrupt:
        faults.end_progress_bars()
        print(str(interrupt) or "interrupted", file=sys.stderr)     # Ctrl-C outside any stage carries no text
        raise SystemExit(128 + getattr(interrupt, "number", signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)
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


@contextmanager
def timed(timing: dict, phase: str):
    """Add the seconds spent in the block to timing[phase]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[phase] = round(timing.get(phase, 0.0) + time.perf_counter() - start, 3)


@contextmanager
def heartbeat(what: str, loud: bool = True, estimate: float | None = None, every: float = 10.0):
    """For work that shows no progress of its own (a solver's fit): a line when it starts, with `estimate` (its
    expected seconds) when known, one every `every` seconds with the time elapsed, and one when it ends."""
    import threading

    if not loud:
        yield
        return
    expected = f" of about {estimate:.0f} s" if estimate else ""
    print(f"{what}: started{f' (about {estimate:.0f} s)' if estimate else ''}", file=sys.stderr, flush=True)
    start, done = time.perf_counter(), threading.Event()

    def beat():
        while not done.wait(every):
            print(f"{what}: {time.perf_counter() - start:.0f} s{expected} elapsed", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print(f"{what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------


# Folders the project keeps inside output_dir itself, each with what it holds: never a run's name.
RESERVED_NAMES = {"cache": "the feature cache of exercise 1 and of exercise 3's linear probe"}
# Folders a run keeps in its run folder, each with what it holds: a resumed run finds them there already.
RUN_FOLDERS = {"checkpoints": "exercise 3's training checkpoints", "predictions": "the per-sample predictions",
               "adapter": "the LoRA adapter", "model": "exercise 3's fine-tuned model",
               "tensorboard": "TensorBoard's event files", "wandb": "the W&B run"}


def owned_folder(path: Path, what: str) -> Path:
    """`path`, where the project keeps a folder holding `what`, unless something other than a folder (a plain
    file) is in its place: then one line naming it, before any work would fail on it. Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LabError(f"{path} is a file, but the project keeps a folder there ({what}); move or remove it")
    return path


def check_output_dir(output_dir: str) -> Path:
    """`output_dir` if a run can be written there, else one line saying why (also for a file in place of a folder
    the project keeps in it): checked before any data or model is loaded, so a typo costs seconds. Nothing is
    created here."""
    base = Path(output_dir).expanduser()
    existing = base
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    owned_folder(existing, "output_dir, where run folders go" if existing == base else f"output_dir {base} is in it")
    for folder, what in RESERVED_NAMES.items():
        owned_folder(base / folder, what)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LabError(f"cannot write to output folder {base}: {existing} is not writable; "
                       f"set output_dir=<a writable folder>")
    return base


def check_run_name(run_name) -> str | None:
    """`run_name` as one plain folder name inside output_dir (None: a name is made when the run starts)."""
    if run_name is None:
        return None
    name = str(run_name)
    if name in ("", ".", "..") or any(separator in name for separator in ("/", "\\", os.sep)) or name in RESERVED_NAMES:
        raise LabError(f"run_name {name!r} must be one plain folder name inside output_dir: no '/', '\\' or '..', "
                       f"and not {', '.join(RESERVED_NAMES)} (the project keeps its own files there)")
    return name


def prepare_run_dir(output_dir: str, run_name: str | None, exercise: str,
                    overwrite: bool = False, resume: bool | None = None) -> Path:
    """Reserve `<output_dir>/<run_name>` for this run and return it.

    The folder is created exclusively, so two runs never share one, even when started together with the
    same `run_name` or the same default `<exercise>-<time>`: the later one gets a `-2`, `-3`... suffix.
    With `resume` the named folder is continued, with `overwrite` it is emptied first. `resume=None`: the
    exercise cannot resume, and messages do not suggest it. A file where the named folder (or, resumed, one of
    its RUN_FOLDERS) should be is a LabError, before the run writes anything.
    """
    base = check_output_dir(output_dir)
    name = check_run_name(run_name) or f"{exercise}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LabError(f"cannot write to output folder {base}: {error.strerror or error}; "
                       f"set output_dir=<a writable folder>") from None
    run_dir = owned_folder(base / name, "the sweep's folder" if exercise == "sweep" else "the run folder")
    if resume or overwrite:
        if overwrite and not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(exist_ok=True)
        for folder, what in RUN_FOLDERS.items():     # a resumed run's own folders, checked before it works for them
            owned_folder(run_dir / folder, what)
        return run_dir
    suffix = 1
    while True:
        candidate = base / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            candidate.mkdir()             # atomic: exactly one process creates it
        except FileExistsError:
            suffix += 1
            continue
        except OSError as error:
            raise LabError(f"cannot write to output folder {candidate}: {error.strerror or error}; "
                           f"set output_dir=<a writable folder>") from None
        if suffix > 1 and run_name is not None:
            hint = "overwrite=True replaces it" + (", resume=True continues it" if resume is not None else "")
            print(f"run folder {run_dir} is taken; writing this run to {candidate.name} ({hint})")
        return candidate


# ---------------------------------------------------------------------------------------------
# Files another run may read while this one writes them
# ---------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that no reader, in this run or another, ever sees a partial file: a temporary
    file named for this process alone, in the same folder, is flushed to disk and then renamed over `path`
    (faults.replace_whole). A failed write is a faults.WriteError naming `path`."""
    def write(tmp: Path):
        with open(tmp, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    faults.replace_whole(path, write)
