"""What exercises 2 and 3 share around the Hugging Face Trainer: precision and reporters from the config,
the run folder under torchrun, checkpoints and resume, one non-finite-loss policy, stop on signal.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch

import utils
from utils import LabError


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


def start_trainer_run(config: dict, state, exercise: str) -> tuple[Path, "utils.RunLoggers | None"]:
    """(run folder, loggers) for a Trainer run: the folder is made by the main process and broadcast, so
    every process writes the same one; the loggers (main process only) start the W&B run that the
    Trainer's WandbCallback then logs into, and its TensorBoard callback writes next to ours."""
    from accelerate.utils import broadcast_object_list

    run_dir = [None]
    if state.is_main_process:
        run_dir[0] = utils.prepare_run_dir(config["output_dir"], config["run_name"], exercise, config["overwrite"],
                                     resume=config["resume"])
    if state.num_processes > 1:
        broadcast_object_list(run_dir)
    run_dir = Path(run_dir[0])
    utils.configure_wandb_env(config, run_dir, exercise)  # every process: wandb_mode=online without a key stops all
    if config["tensorboard"]:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return run_dir, utils.RunLoggers(run_dir, config, exercise) if state.is_main_process else None


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


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite in every process: all stop together, none waits on the others."""
    return not largest_across_processes(int(not torch.isfinite(loss.detach()).all()), loss.device)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the backward pass so the weights stay good."""


class NonFiniteLossGuard:
    """Stops training at the first NaN or infinite loss and saves nothing more, so the newest checkpoint
    on disk is the last good one. Under DDP the processes agree at every step, so they all stop at the
    same one."""

    def __init__(self):
        self.bad_loss = None             # (step, value) of the first non-finite loss seen here
        self.stopped = False             # once the processes agree

    def observe_loss(self, loss, step: int) -> None:
        if self.bad_loss is None and not bool(loss.isfinite().all()):
            self.bad_loss = (step, float(loss.detach().float().mean()))

    def on_step_end(self, control, device):
        """Runs after every other callback, so it can veto the saves they schedule."""
        if largest_across_processes(int(self.bad_loss is not None), device):
            self.stopped = True
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False

    def on_epoch_end(self, control):
        if self.stopped:  # the Trainer would evaluate and save at the end of the epoch cut short
            control.should_save = control.should_evaluate = False


def make_trainer(guard: NonFiniteLossGuard, callbacks=(), **kwargs):
    """A Trainer whose every training loss the guard sees (its callback runs last), and whose
    length-grouped order is seeded by (seed, epoch), so a run resumed mid-epoch replays the same batches."""
    import torch
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class GuardCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            guard.on_step_end(control, args.device)

        def on_epoch_end(self, args, state, control, **_):
            guard.on_epoch_end(control)

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        # the stock one draws from the global RNG when an epoch starts, which a resume cannot replay
        def __init__(self, batch_size: int, lengths: list[int], seed: int):
            super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int):
            self.epoch = epoch

        def __iter__(self):
            self.generator.manual_seed(self.seed + self.epoch)
            return super().__iter__()

    class GuardedTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            guard.observe_loss(loss, self.state.global_step + 1)
            return loss

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            return sampler

    return GuardedTrainer(callbacks=[*callbacks, GuardCallback()], **kwargs)


def training_arguments(config: dict, run_dir: Path, report_to: list[str], device: str):
    from transformers import TrainingArguments

    precision = trainer_precision(config["mixed_precision"], device)
    lora = config["lora"]["enabled"]
    steps = config["eval_strategy"] == "steps"
    return TrainingArguments(
        output_dir=str(run_dir),
        run_name=run_dir.name,
        report_to=report_to or "none",
        seed=config["seed"],
        learning_rate=config["lora"]["learning_rate"] if lora else config["learning_rate"],
        num_train_epochs=config["num_train_epochs"],
        max_steps=config["max_steps"] or -1,
        per_device_train_batch_size=config["batch_size"],
        per_device_eval_batch_size=config["eval_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        weight_decay=config["weight_decay"],
        warmup_steps=config["warmup"],
        lr_scheduler_type=config["lr_scheduler_type"],
        max_grad_norm=config["max_grad_norm"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        train_sampling_strategy="group_by_length" if config["group_by_length"] else "random",
        eval_strategy=config["eval_strategy"],
        eval_steps=config["eval_steps"] if steps else None,
        save_strategy=config["eval_strategy"],  # the best checkpoint can only be one that was evaluated
        save_steps=config["eval_steps"] if steps else None,
        save_total_limit=config["save_total_limit"],
        load_best_model_at_end=True,
        metric_for_best_model=config["metric_for_best_model"],
        logging_strategy="steps",
        logging_steps=config["logging_steps"],
        label_names=["labels"],
        dataloader_pin_memory=device == "cuda",
        use_cpu=device == "cpu",  # also what makes torchrun on CPU use DDP (gloo) instead of N separate runs
    )
