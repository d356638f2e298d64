"""An on-disk cache of arrays (exercise 1's features), keyed by everything that changes them.

Entries are safetensors files in one folder (`<output_dir>/cache`), written atomically, so runs may share
the folder; an entry that cannot be used (truncated, overwritten, of another shape) is removed and computed
again with a warning instead of failing every later run.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import faults
from utils import write_atomic


def model_fingerprint(model_name: str) -> str:
    """Identity of a model for cache keys: the name, plus config and weight file sizes/times of its folder: a
    local folder, or for a Hub id the cached snapshot it loaded from (named for its commit), so features made
    by one revision of a Hub model are never reused for another."""
    path = Path(model_name).expanduser()
    parts = [model_name]
    if not path.exists():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model_name, local_files_only=True))
            parts.append(path.name)
        except Exception:       # not in the cache (e.g. loaded from elsewhere): the name alone
            pass
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


# A temporary file older than this was left by a run killed while writing (writes take seconds).
STALE_SECONDS = 3600
# Cache folders this process failed to write to (disk full, permission lost): warned about once, then only read.
_UNWRITABLE: set[Path] = set()


def entry_path(cache_dir: Path, key: dict, name: str = "features") -> Path:
    """Where the entry for `key` lives: a hash of the key, so any change to it makes another file."""
    key_text = json.dumps(key, sort_keys=True)
    return Path(cache_dir) / f"{name}-{hashlib.sha256(key_text.encode()).hexdigest()[:24]}.safetensors"


def kept_entries(cache_dir: Path, keys: list[dict], name: str = "features") -> str:
    """For the line a stopped run ends in: the entries of `keys` (each with its `split`) that the cache holds,
    which a rerun reuses instead of computing them again."""
    held = [str(key.get("split")) for key in keys if entry_path(cache_dir, key, name).is_file()]
    if not held:
        return f"no {name} were cached yet"
    one = len(held) == 1
    return (f"the {len(held)} cache {'entry' if one else 'entries'} of {name} written so far ({', '.join(held)}) "
            f"{'is' if one else 'are'} kept in {cache_dir}, and a rerun reuses {'it' if one else 'them'}")


def cached_array(cache_dir: Path, key: dict, compute, name: str = "features", rows: int | None = None,
                 dtype=None, write: bool = True) -> tuple[np.ndarray, bool]:
    """Return (array, from_cache). The array is stored as safetensors under a hash of `key`. An entry that
    cannot be used (damaged file, another key, not `rows` rows or not of `dtype`) is removed with a warning
    and computed again. `write=False` (a process other than the main one under torchrun, which computes the
    same array) only reads: the main process writes the entry, once."""
    from safetensors.numpy import save

    key_text = json.dumps(key, sort_keys=True)
    path = entry_path(cache_dir, key, name)
    if path.exists():
        array, problem = _read_entry(path, key_text, name, rows, dtype)
        if problem is None:
            return array, True
        if not write:
            return compute(), False
        if path.is_dir():   # a folder in the entry's place: the atomic rename onto it would fail too
            shutil.rmtree(path, ignore_errors=True)
        path.unlink(missing_ok=True)
        print(f"warning: cache file {path} is unusable ({problem}); removed it, computing {name} again",
              file=sys.stderr)
    array = compute()
    if path.parent in _UNWRITABLE or not write:
        return array, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, save({name: np.ascontiguousarray(array)}, metadata={"key": key_text}))
    except OSError as error:
        # The cache only saves time, and the array is computed and in memory: a full or lost cache disk warns once
        # and the run goes on without it. The largest entry (the train split's) dwarfs every other file a run
        # writes, so a disk too full for it may well still hold the results.
        _UNWRITABLE.add(path.parent)
        print(f"warning: {faults.write_fault(faults.as_write_error(error, path), f'going on without caching {name}')}"
              f" (this run keeps them in memory; a later run computes them again)", file=sys.stderr)
        return array, False
    for stale in path.parent.glob(".*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_SECONDS:
                stale.unlink()
        except FileNotFoundError:  # another run cleaned it up first
            pass
    return array, False


def _read_entry(path: Path, key_text: str, name: str, rows: int | None, dtype) -> tuple[np.ndarray | None, str | None]:
    """(the stored array, None), or (None, why it cannot be used)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as file:
            stored_key, array = (file.metadata() or {}).get("key"), file.get_tensor(name)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        return None, f"{type(error).__name__}: {error}"
    if stored_key != key_text:
        return None, "it was written for another key"
    if rows is not None and array.shape[:1] != (rows,):
        return None, f"{array.shape[0] if array.ndim else 'no'} rows, not {rows}"
    if dtype is not None and array.dtype != dtype:
        return None, f"dtype {array.dtype}, not {np.dtype(dtype)}"
    return array, None
