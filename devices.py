"""What the hardware really has: the precision to compute in, autocast for inference, data-loader workers and
pinned memory, for every script that runs a model.

On CUDA, mixed precision is bf16 where the GPU computes it natively (Ampere, compute capability 8.0, or newer)
and fp16 on older GPUs (T4, V100), whose tensor cores have fp16 but which only emulate bf16. On a CPU the
default is fp32: bf16 matmuls there are many times slower. An explicit `bf16` still runs on a CPU, to check
the dtype paths of a run on a small model.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from utils import LabError

PRECISIONS = ("auto", "no", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16() -> bool:
    """True on a CUDA GPU that computes bf16 itself. torch's default check also counts emulation, which
    is true on pre-Ampere GPUs too."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def precision(setting: str, device: str) -> str:
    """The precision for a `mixed_precision` setting on `device`: "no" (fp32), "bf16" or "fp16"."""
    if setting not in PRECISIONS:
        raise LabError(f"mixed_precision must be one of {list(PRECISIONS)}, got {setting!r}")
    if setting == "auto":
        return ("bf16" if native_bf16() else "fp16") if device == "cuda" else "no"
    if setting == "fp16" and device != "cuda":
        raise LabError(f"mixed_precision=fp16 needs a CUDA GPU; use auto, no or bf16 on {device}")
    return setting


def replay_precision(recorded: str, device: str) -> str:
    """The precision in which a later command (predict.py) reruns a model that a run computed in `recorded` ("auto"
    is resolved here): the same where `device` can compute it, so the scores agree; fp32 otherwise, with a note."""
    if recorded == "auto" or recorded in ("no", "bf16") or device == "cuda":
        return precision(recorded, device)
    print(f"note: the run computed in {recorded}, which needs a CUDA GPU; predicting in fp32 on {device}, so "
          f"scores may differ slightly from the run's", file=sys.stderr)
    return "no"


def warn_slow_precision(chosen: str, device: str) -> None:
    """One note when a run asks for bf16 on a CPU: it works, for checking dtype paths, but slowly."""
    if chosen == "bf16" and device == "cpu":
        print("note: mixed_precision=bf16 on the CPU is far slower than fp32; it is there to check a run's "
              "dtype paths on a small model", file=sys.stderr)


def autocast(device: str, chosen: str):
    """torch.autocast for inference in the `chosen` precision ("no": a context that does nothing)."""
    if chosen == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[chosen])


def loader_workers(setting, device: str) -> int:
    """Data-loader worker processes for a `dataloader_num_workers` setting: a whole number, or "auto", which is
    0 on a CPU (the model needs the cores) and on CUDA a share of the cores: those this process may use,
    divided among the processes on this machine, one kept for the main process."""
    if setting == "auto":
        if device != "cuda":
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return max(1, min(8, per_process - 1))
    try:
        workers = int(str(setting))
    except ValueError:
        workers = -1
    if workers < 0:
        raise LabError(f"dataloader_num_workers must be auto or a whole number >= 0, got {setting!r}")
    return workers


def pin_memory(device: str) -> bool:
    """Page-locked host batches copy to a GPU asynchronously; on a CPU they only cost memory."""
    return device == "cuda"


def to_device(batch, device: str) -> dict:
    """Each tensor of `batch` (a dict, or a tokenizer's BatchEncoding) on `device`: on CUDA from page-locked memory
    and without waiting for the copy (pin_memory), elsewhere as it is."""
    if pin_memory(device):
        return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}
    return {key: value.to(device) for key, value in batch.items()}
