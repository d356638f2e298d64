"""The shared assets folder for tests, demos and benchmarks: never read by the exercises or predict.py.

A user's run has no `../shared`; whatever a run needs ships with the project (see `class_names/`).
"""
from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    """The read-only assets folder (`LAB_SHARED_DIR`, default `../shared` from the repo root)."""
    return Path(os.environ.get("LAB_SHARED_DIR", Path(__file__).resolve().parent.parent.parent / "shared"))
