"""Text LoRA: parameter accounting for the classic variants against the formula, rsLoRA scaling, the
head staying trainable, and an exercise 2 run whose saved adapter reproduces its test loss."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          DistilBertConfig, DistilBertForSequenceClassification)

import data
import LoRA
import exercise_2
import utils

HIDDEN, LAYERS, LABELS = 32, 3, 3


def tiny_classifier(model_type: str):
    torch.manual_seed(0)
    if model_type == "distilbert":
        config = DistilBertConfig(vocab_size=120, dim=HIDDEN, n_layers=LAYERS, n_heads=2, hidden_dim=64,
                                  num_labels=LABELS)
        return DistilBertForSequenceClassification(config)
    config = BertConfig(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=64, num_labels=LABELS)
    return BertForSequenceClassification(config)


def head_parameters(model_type: str) -> int:
    """DistilBERT's head is pre_classifier + classifier; BERT's is the classifier (its pooler is pretrained)."""
    classifier = HIDDEN * LABELS + LABELS
    return classifier + (HIDDEN * HIDDEN + HIDDEN if model_type == "distilbert" else 0)


VARIANTS = {  # name -> (target_modules, use_rslora)
    "query": (["query"], False),
    "key": (["key"], False),
    "query+value": (["query", "value"], False),
    "rslora query+value": (["query", "value"], True),
}
NATIVE = {"distilbert": {"query": "q_lin", "key": "k_lin", "value": "v_lin"},
          "bert": {"query": "query", "key": "key", "value": "value"}}


@pytest.mark.parametrize("model_type", ["distilbert", "bert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("names", ["generic", "native"])
def test_trainable_parameters_follow_the_formula(model_type, variant, names):
    roles, rslora = VARIANTS[variant]
    targets = roles if names == "generic" else [NATIVE[model_type][role] for role in roles]
    r, alpha = 4, 8
    base = tiny_classifier(model_type)
    _, base_total = LoRA.count_parameters(base)
    inputs = {"input_ids": torch.tensor([[2, 17, 33, 54, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        before = base.eval()(**inputs).logits

    model = LoRA.apply_lora(base, {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": targets,
                                   "use_rslora": rslora})
    trainable, total = LoRA.count_parameters(model)
    # every adapted projection is a hidden x hidden linear: A is r x in, B is out x r
    lora = LAYERS * len(roles) * r * (HIDDEN + HIDDEN)
    assert trainable == lora + head_parameters(model_type)
    assert total == base_total + lora + head_parameters(model_type)  # PEFT keeps a frozen copy of the head

    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {NATIVE[model_type][role] for role in roles}
    trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in name or "modules_to_save" in name for name in trainable_names)
    assert any("classifier.modules_to_save" in name for name in trainable_names)
    scaling = {module.scaling["default"] for module in model.modules() if hasattr(module, "lora_A")}
    assert scaling == {alpha / math.sqrt(r) if rslora else alpha / r}
    with torch.no_grad():  # B starts at zero: the wrapped model computes exactly what the base did
        assert torch.allclose(model.eval()(**inputs).logits, before)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(utils.LabError, match="do not fit distilbert"):
        LoRA.apply_lora(tiny_classifier("distilbert"), {"r": 4, "alpha": 8, "dropout": 0.0,
                                                        "target_modules": ["attn_q"], "use_rslora": False})


def test_exercise_2_with_lora_saves_an_adapter_that_reproduces_the_run(tiny_distilbert, rt_dir, tmp_path,
                                                                        one_torch_thread):
    run_dir = exercise_2.main([f"model_name={tiny_distilbert}", f"dataset={rt_dir}", f"output_dir={tmp_path}",
                               "max_train_samples=64", "max_eval_samples=32", "batch_size=8", "eval_batch_size=32",
                               "max_steps=6", "eval_strategy=steps", "eval_steps=3", "lora.enabled=True",
                               "lora.r=4", "lora.learning_rate=1e-2", "wandb_mode=disabled", "tensorboard=false",
                               "seed=0"])
    results = json.loads((run_dir / "results.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_distilbert, num_labels=2)
    hidden, layers = base.config.dim, base.config.n_layers
    lora = layers * 2 * 4 * (hidden + hidden)  # query and value
    head = hidden * hidden + hidden + hidden * 2 + 2
    assert results["model"]["trainable_parameters"] == lora + head
    assert results["model"]["parameters"] == LoRA.count_parameters(base)[1] + lora + head
    assert results["model"]["lora"]["target_modules"] == ["query", "value"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run_dir / "adapter").iterdir()}

    # the adapter alone (LoRA weights + trained head) on a fresh base gives the run's test loss
    model = LoRA.load_adapter(base, run_dir / "adapter").eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_distilbert)
    test = data.load_text_dataset(str(rt_dir), seed=0, max_train_samples=64, max_eval_samples=32)["test"]
    batch = tokenizer(list(test["text"]), truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=torch.tensor(list(test["label"]))).loss.item()
    assert loss == pytest.approx(results["metrics"]["fine_tuned"]["test"]["loss"], rel=1e-4)
