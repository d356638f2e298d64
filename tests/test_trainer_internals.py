"""The private transformers internals trainer_internals.py relies on, each checked by name: still there, with the
signature and the callers it is used with. A transformers upgrade that removes or changes one fails here, naming
it and why it is used, before a resumed run silently trains on other batches or a checkpoint is half written. And
no other module of the project may use a private attribute of the Trainer or of its callbacks."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer, TrainerState, TrainingArguments, trainer_callback
from transformers import trainer as trainer_module
from transformers.trainer_pt_utils import LengthGroupedSampler

import trainer_internals

ROOT = Path(__file__).resolve().parent.parent


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def problems(*checks: tuple[bool, str]) -> list[str]:
    return [what for ok, what in checks if not ok]


def calls(caller: str, text: str) -> bool:
    """Whether the Trainer's method `caller` exists and its source has `text`."""
    method = getattr(Trainer, caller, None)
    return method is not None and text in inspect.getsource(method)


def method_problems(name: str, expected: list[str] | None = None) -> list[str]:
    """What is wrong with the Trainer's method `name`: missing, or with other parameters than `expected`."""
    method = getattr(Trainer, name, None)
    if method is None:
        return [f"Trainer has no {name}"]
    return problems((expected is None or parameters(method) == expected, f"its parameters are {parameters(method)}"))


def check_get_train_sampler() -> list[str]:
    return method_problems("_get_train_sampler", ["self", "train_dataset"]) + problems(
        (calls("get_train_dataloader", "self._get_train_sampler"), "get_train_dataloader no longer builds its sampler"),
        (calls("_run_epoch", "set_epoch(epoch)"), "the loop no longer tells its sampler the epoch"))


def check_length_grouped_sampler() -> list[str]:
    expected = ["self", "batch_size", "dataset", "lengths", "model_input_name", "generator"]
    if parameters(LengthGroupedSampler.__init__) != expected:
        return [f"its parameters are {parameters(LengthGroupedSampler.__init__)}"]
    lengths = list(range(1, 41))
    generator = torch.Generator()
    sampler = LengthGroupedSampler(4, lengths=lengths, generator=generator)

    def order(seed: int) -> list[int]:
        generator.manual_seed(seed)
        return list(sampler)

    return problems((getattr(sampler, "batch_size", None) == 4, "it keeps no batch_size"),
                    (getattr(sampler, "lengths", None) == lengths, "it keeps no lengths"),
                    (order(0) == order(0) != order(1), "its order is not drawn from the generator it is given"))


def check_run_epoch() -> list[str]:
    return method_problems("_run_epoch") + problems(
        (calls("_inner_training_loop", "self._run_epoch("), "the training loop no longer calls it"),
        (calls("_inner_training_loop", "if self.control.should_training_stop:"),
         "the training loop no longer stops on control.should_training_stop after an epoch"))


def check_save_checkpoint() -> list[str]:
    return method_problems("_save_checkpoint", ["self", "model", "trial"]) + problems(
        (calls("_maybe_log_save_evaluate", "self._save_checkpoint(model, trial)"),
         "the training loop no longer saves through it"),
        (calls("_save_checkpoint", "self.state.save_to_json("),
         "it no longer writes trainer_state.json through TrainerState.save_to_json"),
        (parameters(TrainerState.save_to_json) == ["self", "json_path"],
         f"TrainerState.save_to_json's parameters are {parameters(TrainerState.save_to_json)}"))


def check_get_output_dir() -> list[str]:
    return method_problems("_get_output_dir", ["self", "trial"]) + problems(
        (calls("_save_checkpoint", "self._get_output_dir(trial=trial)"),
         "_save_checkpoint no longer writes into the folder it names"))


CHECKS = {"Trainer._get_train_sampler": check_get_train_sampler, "LengthGroupedSampler": check_length_grouped_sampler,
          "Trainer._run_epoch": check_run_epoch, "Trainer._save_checkpoint": check_save_checkpoint,
          "Trainer._get_output_dir": check_get_output_dir}


def test_every_internal_the_module_names_is_checked_here():
    assert set(CHECKS) == set(trainer_internals.INTERNALS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_each_internal_is_still_there_as_it_is_used(name):
    found = CHECKS[name]()
    assert not found, (f"transformers {transformers.__version__} changed {name}: {'; '.join(found)}. What "
                       f"trainer_internals.py uses it for: {trainer_internals.INTERNALS[name]}")


def test_a_length_grouped_run_gets_the_sampler_seeded_by_seed_and_epoch(tmp_path):
    """Through the override, as the Trainer builds its training data loader."""
    dataset = [{"input_ids": list(range(n))} for n in range(1, 41)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                             train_sampling_strategy="group_by_length", seed=3)
    sampler = trainer_internals.ResumableTrainer(model=torch.nn.Linear(1, 1), args=args,
                                                 train_dataset=dataset)._get_train_sampler()
    assert type(sampler) is trainer_internals.SeededLengthGroupedSampler and sampler.batch_size == 4
    first = list(sampler)
    torch.manual_seed(0)                    # the global RNG plays no part
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)


# Attributes the Trainer and its callbacks have without an underscore but without a documented use either
UNDOCUMENTED = ("callback_handler", "training_bar", "prediction_bar", "accepts_loss_kwargs", "model_accepts_loss_kwargs")


def test_no_other_module_uses_a_private_attribute_of_the_trainer_or_its_callbacks():
    """The project's modules, bench/ and tools/; tests may reach internals to inject faults."""
    private = set()
    for module in (trainer_module, trainer_callback):
        source = inspect.getsource(module)
        private |= set(re.findall(r"\bself\.(_[A-Za-z]\w*)", source)) | set(re.findall(r"\bdef (_[A-Za-z]\w*)", source))
    pattern = re.compile(rf"\.({'|'.join(sorted(private | set(UNDOCUMENTED)))})\b")
    found = [f"{path.relative_to(ROOT)}:{number}: .{match}"
             for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tools/*.py")])
             if path.name != "trainer_internals.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) for match in pattern.findall(line)]
    assert not found, f"private Trainer attributes outside trainer_internals.py: {found}"
