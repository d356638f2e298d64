"""What a later command loads from a run folder (predict.py, resume=True, evaluate's readers), checked before
it is loaded: a file missing, empty, cut short or of the wrong kind, or a file where a folder should be, ends
in one line naming it, what is wrong and what to do, not in a traceback from deep inside a loader.

The checks read headers and indexes only (a JSON file is parsed whole; a safetensors file's header is checked
against the file's length; a zip archive, as torch.save and skops write them, is opened at its central
directory, which is at its end), so a file cut short is caught without loading any weights.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from utils import LabError

ZIP_SUFFIXES = (".pt", ".pth", ".skops")    # torch.save's and skops' archives


def file_problem(path: Path) -> str | None:
    """What is wrong with a file a run saved, or None: missing, a folder, empty, or not whole as the kind
    its suffix says (.json: a JSON object; .safetensors; a zip archive; .skops: one holding skops' schema)."""
    path = Path(path)
    if not path.exists():
        return "is missing"
    if path.is_dir():
        return "is a folder where a file should be"
    if path.stat().st_size == 0:
        return "is empty"
    if path.suffix == ".json":
        return _json_contents(path)[1]
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy"):
                return None
        except SafetensorError as error:
            return f"is not a whole safetensors file ({error}): cut short or overwritten"
    if path.suffix in ZIP_SUFFIXES:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as error:
            return f"is not a whole {path.suffix} file ({error}): cut short or overwritten"
        if path.suffix == ".skops" and "schema.json" not in names:
            return "is a zip archive but not a skops file (no schema.json)"
    return None


def _json_contents(path: Path) -> tuple[dict | None, str | None]:
    try:
        contents = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        return None, f"is not UTF-8 text ({error})"
    except json.JSONDecodeError as error:
        return None, f"is not valid JSON ({error}): cut short or overwritten"
    if not isinstance(contents, dict):
        return None, f"holds a JSON {_kind(contents)}, not an object"
    return contents, None


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number",
            bool: "boolean"}.get(type(value), "null")


def check_file(path: Path, remedy: str) -> Path:
    """`path`, or LabError "<path> <what is wrong>; <remedy>"."""
    problem = file_problem(path)
    if problem:
        raise LabError(f"{path} {problem}; {remedy}")
    return Path(path)


def read_json(path: Path, remedy: str, keys: dict | None = None) -> dict:
    """The JSON object in `path`, each of `keys` ({name: type}) present with that type; else LabError."""
    check_file(path, remedy)
    contents = _json_contents(Path(path))[0]
    for key, kind in (keys or {}).items():
        if key not in contents:
            raise LabError(f"{path} has no {key!r} (a JSON {_kind(kind())}); {remedy}")
        if not isinstance(contents[key], kind):
            raise LabError(f"{path}: {key!r} should be a JSON {_kind(kind())}, found "
                           f"{json.dumps(contents[key])[:60]}; {remedy}")
    return contents


def folder_problem(folder: Path, required=()) -> tuple[Path, str] | None:
    """(the path, what is wrong with it) for a folder a run saved, or None: not a folder, a `required` file
    with a problem, or any JSON or safetensors file in it (what from_pretrained reads) that is damaged."""
    folder = Path(folder)
    if not folder.is_dir():
        return folder, "is missing" if not folder.exists() else "is a file where a folder should be"
    present = sorted(path.name for path in folder.iterdir() if path.suffix in (".json", ".safetensors"))
    for name in dict.fromkeys([*required, *present]):
        problem = file_problem(folder / name)
        if problem:
            return folder / name, problem
    return None


def check_folder(folder: Path, required, remedy: str) -> Path:
    """`folder`, or LabError "<the folder or the file in it> <what is wrong>; <remedy>"."""
    found = folder_problem(folder, required)
    if found:
        raise LabError(f"{found[0]} {found[1]}; {remedy}")
    return Path(folder)


# What resume=True loads from a checkpoint: the Trainer's state, the weights, the optimizer and scheduler, and
# the RNG state (rng_state.pth, or rng_state_<rank>.pth per process). The Trainer silently goes on without an
# optimizer, scheduler or RNG file it does not find, so each is required.
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")     # a LoRA run's weights


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes a checkpoint-N folder unusable for resume=True (a file missing, empty, cut short or of the
    wrong kind), or None. Its weights are the adapter's when it holds either adapter file, else the model's:
    read from the folder, not from the config, which resume_changes=True may have changed."""
    lora = checkpoint.is_dir() and any((checkpoint / name).exists() for name in ADAPTER_FILES)
    found = folder_problem(checkpoint, (*CHECKPOINT_FILES, *(ADAPTER_FILES if lora else ("model.safetensors",))))
    if found:
        return f"it {found[1]}" if found[0] == checkpoint else f"{found[0].name} {found[1]}"
    rng = sorted(checkpoint.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    for path in [*rng, *checkpoint.glob("scaler.pt")]:      # scaler.pt: only runs in fp16 have one
        problem = file_problem(path)
        if problem:
            return f"{path.name} {problem}"
    return None


def check_checkpoints(folder: Path) -> None:
    """resume=True continues the newest checkpoint-N in `folder`. When that one is damaged (also when a run
    killed while saving left it without trainer_state.json) it is refused, naming it and the newest whole
    checkpoint before it: going back loses the steps since, so that is for the user to choose, by deleting
    the damaged folder. Skipping it by itself would be silent loss, and under torchrun every process decides
    alone: the damage might be a copy still in progress that some of them see."""
    numbered = sorted((path for path in Path(folder).glob("checkpoint-*") if path.name.split("-")[-1].isdigit()),
                      key=lambda path: int(path.name.split("-")[-1]))
    problem = checkpoint_problem(numbered[-1]) if numbered else None
    if problem is None:
        return
    earlier = next((path for path in reversed(numbered[:-1]) if checkpoint_problem(path) is None), None)
    then = (f"delete {numbered[-1].name} and rerun with resume=True to continue from {earlier.name}, the newest "
            f"whole checkpoint before it" if earlier else "no earlier checkpoint is whole: start the run afresh "
            "with overwrite=True instead of resume=True")
    raise LabError(f"resume=True: the newest checkpoint {numbered[-1]} is damaged: {problem}; {then}")
