"""Loggers of every run: TensorBoard event files and W&B (offline by default), both inside the run folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from utils import LabError, flatten, write_atomic

WANDB_MODES = ("offline", "online", "disabled")



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
        write_atomic(path, os.urandom(6).hex().encode())    # a cut-off id would start another W&B run
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
        flat = {f"{prefix}{key}": value for key, value in flatten(metrics).items()
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
