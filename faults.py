"""How a run ends when a write fails or a signal stops it: in one line that says where it stopped, what it kept
and how to go on, and never with a half-written file that a later run would take for complete.

Every file and folder a run keeps appears whole or not at all (`replace_whole`: written under a hidden
temporary name, then renamed). A failed write (disk full, permission lost, the run folder removed) is a
WriteError naming the file; `stage` turns it, and Ctrl-C or SIGTERM, into the run's one line.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path


class WriteError(OSError):
    """A file or folder of a run could not be written; `filename` is the one meant, never its temporary file."""


# why a write failed, with what to do about it
REASONS = {errno.ENOSPC: "no space left on the device (free some, or set output_dir=<a folder with room>)",
           errno.EDQUOT: "disk quota exceeded (free some, or set output_dir=<a folder with room>)",
           errno.EACCES: "permission denied (make the folder writable again, or set output_dir=<a writable folder>)",
           errno.EPERM: "operation not permitted (make the folder writable again, or set output_dir=<a writable folder>)",
           errno.EROFS: "the file system is read-only (set output_dir=<a writable folder>)",
           errno.ENOENT: "its folder no longer exists (was the run folder removed while the run was going?)"}


def write_fault(error: OSError, kept: str) -> str:
    """The one line for a failed write: the file, why and what to do, then `kept` (what the run keeps, how to go on)."""
    return f"cannot write {error.filename}: {REASONS.get(error.errno, error.strerror)}; {kept}"


def as_write_error(error: BaseException, path) -> WriteError | None:
    """`error`, raised while writing `path`, as a WriteError naming `path`, or None when it is no write fault.
    safetensors and torch.save report a full disk in exceptions of their own (safetensors "... (os error 28)",
    torch.save a bare "unexpected pos"), so those are known by the os error they name, else by the folder being
    gone or the disk being full at that moment."""
    if isinstance(error, WriteError):
        return error
    if isinstance(error, OSError):
        return WriteError(error.errno, error.strerror or str(error), str(path))
    code = re.search(r"os error (\d+)", str(error))
    number = int(code.group(1)) if code else None
    folder = Path(path).parent
    if number is None and not folder.is_dir():
        number = errno.ENOENT
    elif number is None and shutil.disk_usage(folder).free < 2 ** 20:
        number = errno.ENOSPC
    return None if number is None else WriteError(number, os.strerror(number), str(path))


def replace_whole(path: Path, write) -> Path:
    """Make `path` whole or not at all: `write(tmp)` writes a file or a folder (a save_pretrained) at `tmp`, a
    hidden name beside `path` of this process alone, and a rename then puts it in place of any earlier one, so
    no reader, in this run or another, ever sees part of it. A failed write removes `tmp` and raises WriteError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    old = None
    try:
        write(tmp)
        if tmp.is_dir() and path.exists():     # a rename cannot replace a folder that holds files: move it aside
            old = tmp.with_name(f"{tmp.name}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    except Exception as error:
        fault = as_write_error(error, path)
        if fault is None:
            raise
        raise fault from error
    finally:
        for leftover in (tmp, old):
            _remove(leftover)
    return path


def make_folder(path: Path) -> Path:
    """`path` as a folder inside an existing one: never with parents, so a run folder removed while the run
    was going is not made anew (and filled with half a run); a failure is a WriteError."""
    try:
        Path(path).mkdir(exist_ok=True)
    except OSError as error:
        raise as_write_error(error, path) from error
    return Path(path)


def _remove(path: Path | None) -> None:
    """Remove a temporary file or folder if it is there; one that cannot go (permission lost) stays, hidden."""
    try:
        if path is not None and path.is_dir():
            shutil.rmtree(path)
        elif path is not None:
            path.unlink(missing_ok=True)
    except OSError:
        pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; `message`, once a stage has set it, says where the run stopped and what it kept.
    A KeyboardInterrupt, so everything that cleans up after Ctrl-C (finally blocks, thread pools, data
    loaders, replace_whole's temporary files) does so after SIGTERM too."""

    def __init__(self, number: int = signal.SIGINT, message: str | None = None):
        super().__init__(message or f"interrupted ({signal.Signals(number).name})")
        self.number, self.message = number, message


def end_progress_bars() -> None:
    """Close the progress bars a stopped loop left open, so that the one line which follows starts a line of its
    own instead of trailing the bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def raise_interrupted(number, frame):
    """A SIGTERM handler: Python's default kills the process where it stands, with no cleanup at all."""
    raise Interrupted(number)


@contextmanager
def stage(what, kept):
    """A step of a run that writes or takes a while. Inside it, Ctrl-C or SIGTERM ends in one line,
    "interrupted (SIGTERM) during <what>: <kept>" (utils.run_cli exits 130 / 143), and a failed write in
    "cannot write <file>: <why>; <kept>" (a LabError, exit 2). `kept` says what the run leaves and how to go
    on: a string, or a function giving it, called only then (it may look at what is on disk). An inner stage's
    line is kept as it is."""
    from utils import LabError

    try:
        yield
    except KeyboardInterrupt as interrupt:
        if getattr(interrupt, "message", None):
            raise
        number = getattr(interrupt, "number", signal.SIGINT)
        raise Interrupted(number, f"interrupted ({signal.Signals(number).name}) during {what}: "
                                  f"{kept() if callable(kept) else kept}") from None
    except WriteError as error:
        raise LabError(write_fault(error, kept() if callable(kept) else kept)) from None
