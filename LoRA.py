"""LoRA for exercises 2 and 3: PEFT configs for text classifiers and CLIP, parameter accounting,
adapter save/load and merging into a standalone model.

Both exercises configure LoRA with the same `lora` block (enabled, r, alpha, dropout, target_modules,
use_rslora, modules_to_save, learning_rate). Target modules may be given as roles (`query`, `key`,
`value`, `output`), mapped to each architecture's own names, so one config works for DistilBERT,
BERT/MiniLM, RoBERTa and CLIP; on CLIP a `text_model.` or `vision_model.` prefix adapts one tower only.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

from utils import LabError

# generic role -> module name, per model_type
ATTENTION_NAMES = {
    "distilbert": {"query": "q_lin", "key": "k_lin", "value": "v_lin", "output": "out_lin"},
    "bert": {"query": "query", "key": "key", "value": "value", "output": "attention.output.dense"},
    "roberta": {"query": "query", "key": "key", "value": "value", "output": "attention.output.dense"},
    "clip": {"query": "q_proj", "key": "k_proj", "value": "v_proj", "output": "out_proj"},
}
CLIP_TOWERS = ("vision_model", "text_model")

__all__ = ["apply_lora", "count_parameters", "lora_config", "save_adapter", "load_adapter", "merge", "initial_weights",
           "interpolated"]


def resolve_target_modules(model_type: str, target_modules: list[str]) -> list[str]:
    """Map generic roles to the architecture's module names; other names pass through."""
    names = ATTENTION_NAMES.get(model_type, {})
    return [names.get(target, target) for target in target_modules]


def lora_config(lora_cfg: dict, model_type: str, task_type: str | None = "SEQ_CLS"):
    """A peft.LoraConfig from the config's `lora` section.

    For CLIP (`model_type` "clip") there is no task type, and the targets become a regex over module
    names inside the encoders: `q_proj` in both towers, `text_model.q_proj` in the text tower only.
    """
    from peft import LoraConfig

    if not lora_cfg["target_modules"]:
        raise LabError("lora.target_modules is empty")
    if model_type == "clip":
        patterns = []
        for target in lora_cfg["target_modules"]:
            tower, _, name = target.rpartition(".") if target.startswith(CLIP_TOWERS) else ("", "", target)
            name = resolve_target_modules(model_type, [name])[0]
            patterns.append(rf".*({tower or '|'.join(CLIP_TOWERS)})\..*\.{name}")
        target_modules = rf"^({'|'.join(patterns)})$"
        task_type = None
    else:
        target_modules = resolve_target_modules(model_type, list(lora_cfg["target_modules"]))
    return LoraConfig(task_type=task_type, r=lora_cfg["r"], lora_alpha=lora_cfg["alpha"],
                      lora_dropout=lora_cfg["dropout"], target_modules=target_modules,
                      use_rslora=lora_cfg.get("use_rslora", False), bias="none",
                      # whole modules trained and saved with the adapters (e.g. CLIP's projections)
                      modules_to_save=list(lora_cfg.get("modules_to_save") or []) or None)


def apply_lora(model, lora_cfg: dict, task_type: str | None = "SEQ_CLS"):
    """Wrap `model` with LoRA adapters; only adapters (and, for SEQ_CLS, the head) train."""
    from peft import get_peft_model

    model_type = model.config.model_type
    try:
        with _quiet_wrapping():
            return get_peft_model(model, lora_config(lora_cfg, model_type, task_type))
    except ValueError as error:
        available = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise LabError(f"lora.target_modules {lora_cfg['target_modules']} do not fit {model_type}: {error}. "
                       f"Module names in this model include: {available[:40]}") from None


def save_adapter(model, path: Path) -> Path:
    """Save only the adapter weights and config (safetensors); the folder appears whole or not at all
    (faults.replace_whole), so a full disk never leaves an adapter that loads as if complete."""
    import faults

    return faults.replace_whole(path, lambda folder: model.save_pretrained(str(folder), safe_serialization=True))


def load_adapter(base_model, path: Path, trainable: bool = False):
    from peft import PeftModel

    with _quiet_wrapping():
        return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)


@contextmanager
def _quiet_wrapping():
    """PEFT, wrapping a model, reads transformers 5's deprecated `is_gradient_checkpointing`: a FutureWarning no
    user of these scripts can act on. Only that warning is silenced, and only inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def merge(model):
    """Fold the adapters into the base weights: a plain transformers model with no PEFT layers."""
    return model.merge_and_unload()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def initial_weights(model) -> dict:
    """By parameter name, on the CPU, the value before training of every trained weight that no adapter scale
    reaches: for a PEFT model the originals of its modules_to_save, which PEFT keeps beside the trained copies
    (right before and after training); for a plain model every trainable weight (right before training only)."""
    parameters = dict(model.named_parameters())
    if hasattr(model, "peft_config"):
        copies = [name for name in parameters if ".modules_to_save." in name]
        return {name: parameters[re.sub(r"\.modules_to_save\.[^.]+\.", ".original_module.", name)].detach().to(
            "cpu", copy=True) for name in copies}
    return {name: weight.detach().to("cpu", copy=True) for name, weight in parameters.items() if weight.requires_grad}


@contextmanager
def interpolated(model, alpha: float, initial: dict):
    """Inside the block, the model a fraction `alpha` of the way from its weights before training (0) to the trained
    ones (1): weight-space ensembling, WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models").
    LoRA's update W0 + s*BA is scaled through peft's rescale_adapter_scale, which for an adapter is exactly that
    interpolation; every weight in `initial` (initial_weights) is set to lerp(initial, trained, alpha). All restored
    after. torch.lerp returns its start exactly at 0 and its end at 1, so those scales are the two models."""
    import torch
    from peft.helpers import rescale_adapter_scale
    from peft.tuners.lora import LoraLayer

    parameters = dict(model.named_parameters())
    trained = {name: parameters[name].detach().clone() for name in initial}
    has_adapters = any(isinstance(module, LoraLayer) for module in model.modules())
    with rescale_adapter_scale(model, alpha) if has_adapters else nullcontext():
        try:
            with torch.no_grad():
                for name, start in initial.items():
                    weight = parameters[name]
                    weight.copy_(torch.lerp(start.to(weight.device, weight.dtype), trained[name], float(alpha)))
            yield model
        finally:
            with torch.no_grad():
                for name, value in trained.items():
                    parameters[name].copy_(value)
