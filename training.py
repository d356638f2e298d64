"""What exercises 2 and 3 share around the Hugging Face Trainer: precision and reporters from the config,
the run folder under torchrun, checkpoints and resume, one non-finite-loss policy, stop on signal.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback

import devices
import faults
import loggers
import trainer_internals
import utils
from utils import LabError


def trainer_reporters(config: dict) -> list[str]:
    """The Trainer's report_to: tensorboard and/or wandb, as the config turns them on."""
    return [name for name, on in (("tensorboard", config["tensorboard"]),
                                  ("wandb", config["wandb_mode"] != "disabled")) if on]


def start_trainer_run(config: dict, state, exercise: str) -> tuple[Path, "loggers.RunLoggers | None"]:
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
    if state.is_main_process:  # what the checkpoints are trained with: a later resume=True is compared with it
        utils.write_atomic(run_dir / RUN_CONFIG, json.dumps(config, indent=2).encode())
    loggers.configure_wandb_env(config, run_dir, exercise)  # every process: wandb_mode=online without a key stops all
    if config["tensorboard"]:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return run_dir, loggers.RunLoggers(run_dir, config, exercise) if state.is_main_process else None


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint-N folder (the Trainer writes trainer_state.json last)."""
    complete = [path for path in Path(folder).glob("checkpoint-*")
                if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").exists()]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


def is_distributed() -> bool:
    """True under torchrun (or any initialised process group) with more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_share(count: int) -> range:
    """This process's contiguous share of `count` rows, in rank order (all of them in a single process):
    evaluation outside the Trainer splits its data this way, then joins the shares with accelerate's
    gather_object."""
    if not is_distributed():
        return range(count)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    return range(count * rank // world, count * (rank + 1) // world)


def largest_across_processes(value: int, device) -> int:
    """The largest of `value` over all DDP processes (the value itself in a single process): how the
    processes agree on a decision, so they all take it at the same step."""
    import torch.distributed as dist

    if not is_distributed():
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

    def exit(self, step: int, checkpoint: Path | None, config: dict, run_name: str, announce: bool = True):
        """Say how to continue (when `announce`), then exit with 128 + the signal's number, as shells do."""
        if announce:
            print(f"{signal.Signals(self.received).name}: training stopped at step {step}; checkpoint {checkpoint}. "
                  f"Continue with the same arguments plus resume=True run_name={run_name} "
                  f"output_dir={config['output_dir']}", file=sys.stderr, flush=True)
        raise SystemExit(128 + self.received)


# ---------------------------------------------------------------------------------------------
# Config keys both exercises share, and the TrainingArguments they map to
# ---------------------------------------------------------------------------------------------

CHOICES = {"lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup"),
           "mixed_precision": devices.PRECISIONS, "wandb_mode": loggers.WANDB_MODES}
POSITIVE = ("max_train_samples", "max_eval_samples", "learning_rate", "num_train_epochs", "max_steps", "batch_size",
            "eval_batch_size", "gradient_accumulation_steps", "eval_steps", "logging_steps", "save_total_limit",
            "lora.r", "lora.alpha", "lora.learning_rate")
NON_NEGATIVE = ("weight_decay", "warmup", "max_grad_norm")    # >= 0
FRACTIONS = ("lora.dropout",)                                  # in [0, 1)
INTEGERS = ("max_train_samples", "max_eval_samples", "max_steps")  # whole numbers (their default is None)


def check_config(config: dict, device: str, checkpoints: str = "") -> None:
    """The checks of the shared Trainer keys that parse_config's ranges cannot express, and with resume=True the
    run's settings and its newest checkpoint; `checkpoints`: where the exercise's Trainer saves them in the run."""
    devices.warn_slow_precision(devices.precision(config["mixed_precision"], device), device)
    if "dataloader_num_workers" in config:
        devices.loader_workers(config["dataloader_num_workers"], device)
    utils.check_run_name(config["run_name"])
    utils.check_output_dir(config["output_dir"])  # before any data or model is loaded
    if config["resume"] and not config["run_name"]:
        raise LabError("resume=True needs run_name=<the run to continue> (its folder under output_dir)")
    if config["resume"]:
        import artifacts

        check_resume(config)
        artifacts.check_checkpoints(Path(config["output_dir"]).expanduser() / str(config["run_name"]) / checkpoints)


# Keys that change only what is logged, evaluated or kept, or where the run lives: a resumed run may change
# them freely. Every other key changes training, and a resumed run must keep the value it started with.
OUTPUT_ONLY = ("output_dir", "run_name", "overwrite", "resume", "resume_changes", "wandb_mode", "wandb_project",
               "tensorboard", "logging_steps", "eval_batch_size", "evaluate_pretrained", "save_steps",
               "save_total_limit", "dataloader_num_workers", "num_sample_images", "bad_images", "prompts",
               "trust_remote_code")
RUN_CONFIG = "run_config.json"  # in each run folder: the config its training started with


def check_resume(config: dict) -> None:
    """resume=True continues checkpoints trained with the run's recorded config: a setting that changes
    training and differs from it is refused, naming each (old -> new), unless resume_changes=True."""
    run_dir = Path(config["output_dir"]).expanduser() / str(config["run_name"])
    path = run_dir / RUN_CONFIG
    loud = os.environ.get("RANK", "0") == "0"  # under torchrun, one process says it
    if not run_dir.is_dir():
        return  # nothing to continue: the run starts afresh
    if not path.exists():
        if loud:
            print(f"warning: cannot check that resume=True keeps the settings of {run_dir}: {path.name} is "
                  f"missing (a run from an older version)", file=sys.stderr)
        return
    import artifacts

    old = utils.flatten(artifacts.read_json(path, "it records the settings the checkpoints were trained with: "
                                                  "delete it to resume without checking them (keep them yourself)"))
    new = utils.flatten(config)
    changed = [f"{key} {old[key]!r} -> {new[key]!r}" for key in new
               if key in old and key not in OUTPUT_ONLY and old[key] != new[key]]
    if changed and not config["resume_changes"]:
        raise LabError(f"resume=True with settings that change training: {', '.join(changed)} (the checkpoints in "
                       f"{run_dir} were trained with the old values, recorded in {path.name}); rerun with the old "
                       f"values, or add resume_changes=True to continue with the new ones")
    if changed and loud:
        print(f"warning: resume_changes=True: continuing {run_dir} with changed settings: {', '.join(changed)}",
              file=sys.stderr)


def learning_rate(config: dict) -> float:
    """LoRA adapters start at zero and need larger steps than full fine-tuning: each has its own rate."""
    return config["lora"]["learning_rate"] if config["lora"]["enabled"] else config["learning_rate"]


def shared_arguments(config: dict, device: str) -> dict:
    """The TrainingArguments keys exercises 2 and 3 set alike, none of them part of what either teaches: where the
    Trainer reports, the precision and pinned memory that suit the device, how often it logs, and the label key."""
    precision = devices.precision(config["mixed_precision"], device)
    return dict(report_to=trainer_reporters(config) or "none", bf16=precision == "bf16", fp16=precision == "fp16",
                dataloader_pin_memory=devices.pin_memory(device),
                use_cpu=device == "cpu",  # also what makes torchrun on CPU use DDP (gloo) instead of N separate runs
                logging_strategy="steps", logging_steps=config["logging_steps"],
                label_names=["labels"])   # the collators' key; the Trainer finds none in CLIP's forward itself


# ---------------------------------------------------------------------------------------------
# One non-finite-loss policy, the Trainer both exercises use, and the guard around trainer.train()
# ---------------------------------------------------------------------------------------------

class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised before its backward pass, so no update used it."""


def check_loss(loss: torch.Tensor, step: int) -> None:
    """The policy of both exercises: a NaN or infinite training loss stops training before its backward
    pass, so the weights, and every checkpoint saved so far, are as the last good step left them. Under
    DDP the processes agree first, so they all stop at the same step and none waits on the others."""
    bad_here = not bool(torch.isfinite(loss.detach()).all())
    if largest_across_processes(int(bad_here), loss.device):
        where = f"({loss.detach().float().mean().item()})" if bad_here else "(in another process)"
        raise NonFiniteLossError(f"the loss became NaN or infinite at step {step} {where}")


class LabTrainer(trainer_internals.ResumableTrainer):
    """The stock Trainer plus the non-finite-loss policy, every loss the model's own batch mean, and readable
    progress; trainer_internals adds a batch order a resumed run replays and checkpoints that are complete or
    absent. Exercise 3's CLIPTrainer builds on it."""

    loss_is_scaled_for_ga = False     # a per-batch mean: the Trainer divides it by the accumulation steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(ReadableProgress())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Without num_items_in_batch every model returns its batch mean, as loss_is_scaled_for_ga says. Given it, a
        # model whose loss takes it divides its batch's sum by the count of the accumulated batch of all processes,
        # one that ignores it still returns a mean, and the Trainer multiplies either by the number of processes.
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)
        if model.training:      # evaluation computes losses too; only a training loss stops training
            check_loss(result[0] if return_outputs else result, self.state.global_step + 1)
        return result


class ReadableProgress(TrainerCallback):
    """In place of the Trainer's ProgressCallback: a bar labelled `train`, one labelled `evaluate` for each
    evaluation or prediction, and each log as one readable line instead of a raw dict (main process only)."""

    def __init__(self):
        self.training = self.evaluating = None      # the bars while they run

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training is not None:
            self.training.update(state.global_step - self.training.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.evaluating is None:
            self.evaluating = tqdm(total=len(eval_dataloader), desc="evaluate", leave=self.training is None,
                                   dynamic_ncols=True)
        self.evaluating.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.evaluating is not None:
            self.evaluating.close()
            self.evaluating = None

    on_predict = on_evaluate

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training is not None and logs:
            values = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                               for key, value in logs.items() if key not in ("epoch", "total_flos"))
            self.training.write(f"step {state.global_step}/{state.max_steps} (epoch {state.epoch or 0:.2f}): {values}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.training is not None:
            self.training.close()
            self.training = None


def resume_checkpoint(config: dict, checkpoints: Path, main_process: bool = True) -> str | None:
    """The newest checkpoint to continue from when `resume` is on (None: start afresh)."""
    if not config["resume"]:
        return None
    checkpoint = latest_checkpoint(checkpoints)
    if main_process:
        print(f"resuming from {checkpoint}" if checkpoint else f"resume: no checkpoint in {checkpoints}; starting afresh")
    return str(checkpoint) if checkpoint else None


def resume_hint(checkpoints: Path, config: dict, run_name: str) -> str:
    """What a run stopped by a fault or a signal keeps of its training, and the command that goes on from it."""
    kept = latest_checkpoint(checkpoints)
    if kept is None:
        return f"no complete checkpoint is in {checkpoints}: run again with the same arguments"
    return (f"the last complete checkpoint is {kept}: continue with the same arguments plus resume=True "
            f"run_name={run_name} output_dir={config['output_dir']}")


@contextmanager
def guarded(trainer, stop: StopOnSignal, checkpoints: Path, config: dict, loggers):
    """Around trainer.train(), whose callbacks include `stop.callback()`: Ctrl-C or SIGTERM finishes the
    step, saves a checkpoint and exits with the command that resumes; a non-finite loss (check_loss) ends
    in one error line naming the last good checkpoint. A checkpoint that cannot be written (LabTrainer removes
    what it began) and a second signal, which stops at once, end in one line naming the last complete
    checkpoint and the command that continues from it. All of them finish the loggers first."""
    hint = lambda: f"no results written; {resume_hint(checkpoints, config, trainer.args.run_name)}"
    try:
        with stop, faults.stage("training (a second signal stops at once, without a checkpoint)", hint):
            yield
    except (LabError, KeyboardInterrupt):
        if loggers:
            loggers.finish()
        raise
    except NonFiniteLossError as error:
        if loggers:
            loggers.finish()
        kept = latest_checkpoint(checkpoints)
        raise LabError(f"training stopped: {error}; the update was not applied and "
                       f"{f'the last good checkpoint is {kept}' if kept else 'no checkpoint had been saved yet'}. "
                       f"Lower learning_rate (lora.learning_rate with LoRA) or max_grad_norm and run again") from None
    if stop.received:
        if loggers:
            loggers.finish()
        stop.exit(trainer.state.global_step, latest_checkpoint(checkpoints), config, trainer.args.run_name,
                  trainer.is_world_process_zero())
