"""The private transformers Trainer internals this project relies on, each with why and what breaks without it.

Everything else reaches the Trainer through its public API: TrainingArguments, the overrides its documentation
names (compute_loss, loss_is_scaled_for_ga), callbacks and `log`. What is here has no public route in
transformers 5.23, which requirements.txt pins for it. tests/test_trainer_internals.py checks that each entry of
INTERNALS is still there as it is used here, failing with its name, and that no other module of the project uses a
private attribute of the Trainer or of its callbacks.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

import faults

# each internal: why this module uses it, and what breaks when transformers removes or changes it
INTERNALS = {
    "Trainer._get_train_sampler": (
        "builds the training sampler, whose set_epoch the loop calls as each epoch begins; overridden so that a "
        "length-grouped order is drawn from (seed, epoch) alone. Gone or changed: the batches come from the global "
        "RNG again, and a run resumed mid-epoch trains on other batches than the run it continues"),
    "LengthGroupedSampler": (
        "the stock length-grouped sampler: its batch_size and lengths are read, and the seeded sampler is one that "
        "draws from the generator it is given. Changed: the seeded order is no longer the stock grouping"),
    "Trainer._run_epoch": (
        "one pass over the training data, after which the loop stops if control.should_training_stop; overridden "
        "so that a run resumed from the checkpoint of its last step trains nothing more. Gone: that resume trains a "
        "step past max_steps and ends with other weights and results than the run it continues"),
    "Trainer._save_checkpoint": (
        "writes checkpoint-N, trainer_state.json last (through TrainerState.save_to_json); overridden so that file "
        "is written whole, a failed save removes its folder and raises faults.WriteError, and a removed run folder "
        "is not made anew. Changed: a full disk leaves a half checkpoint that latest_checkpoint takes for complete"),
    "Trainer._get_output_dir": (
        "the folder _save_checkpoint writes checkpoint-N into; its existence is checked first. Gone: no checkpoint "
        "can be saved"),
}


class ResumableTrainer(Trainer):
    """The Trainer with its internals overridden (INTERNALS) for resuming: a length-grouped batch order seeded by
    (seed, epoch), so that a run resumed mid-epoch replays the same batches; no step past max_steps on resume; and
    checkpoints that are complete or absent. training.LabTrainer builds on it."""

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the checkpoint of the last step (training had finished; a write fault or a signal stopped
        # the run after it), the stock loop trains one step past max_steps: there is nothing left to train
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, which latest_checkpoint takes for complete once trainer_state.json is in
        it: that file is written whole and last, and a save that fails (disk full, permission lost) removes the
        folder it began and raises faults.WriteError naming it. A folder removed while the run was going is
        not made anew (the Trainer would), so no half of a run is written into a name another run may take."""
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        if not folder.parent.is_dir():
            raise faults.WriteError(errno.ENOENT, os.strerror(errno.ENOENT), str(folder))
        state, save = self.state, type(self.state).save_to_json
        state.save_to_json = lambda path: faults.replace_whole(path, lambda tmp: save(state, str(tmp)))
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            fault = faults.as_write_error(error, folder)
            if fault is None:
                raise
            if self.is_world_process_zero():
                shutil.rmtree(folder, ignore_errors=True)
            raise fault from error
        finally:
            del state.save_to_json


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """The stock sampler draws from the global RNG when an epoch starts, which a resume cannot replay."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.seeded = torch.Generator()
        super().__init__(batch_size, lengths=lengths, generator=self.seeded)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        self.seeded.manual_seed(self.seed + self.epoch)
        return super().__iter__()
