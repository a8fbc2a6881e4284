"""Building the model a run fine-tunes (labels, r-softmax, gradient checkpointing, LoRA) and saving what it made.

A full fine-tune saves a regular checkpoint whose ``config.json`` carries the r-softmax settings, so
:func:`rsoft_nlp.load_model` restores it. A LoRA run saves the adapter (with the classifier head, which is trained
in full) beside ``rsoftmax_base.json`` (base model, labels, r-softmax settings), and the merged model under
``merged/``; :func:`load_finetuned` loads either kind.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from rsoft_nlp.checkpointing import save_pretrained_atomic, write_json_atomic
from rsoft_nlp.config import ConfigError, FinetuneConfig
from rsoft_nlp.glue import GlueTask, get_task
from rsoft_nlp.patching import load_model, patch_model

logger = logging.getLogger(__name__)

__all__ = ["BASE_FILE", "build_model", "label_settings", "load_finetuned", "save_finetuned"]

BASE_FILE = "rsoftmax_base.json"
# Attention projections of BERT-style encoders, the usual LoRA targets.
DEFAULT_LORA_TARGETS = ("query", "value")


def label_settings(task: GlueTask) -> dict[str, Any]:
    """The config entries that give a model the task's head: label count, names and problem type."""
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    return {
        "num_labels": task.num_labels,
        "id2label": dict(enumerate(task.label_names)),
        "label2id": {name: i for i, name in enumerate(task.label_names)},
        "problem_type": "single_label_classification",
    }


def _base_model(name: str, task: GlueTask, r, layers) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(name, finetuning_task=task.name, **label_settings(task))
    model = AutoModelForSequenceClassification.from_pretrained(name, config=config, ignore_mismatched_sizes=True)
    if r is not None:
        patch_model(model, r=r, layers=layers)
    return model


def build_model(cfg: FinetuneConfig, task: GlueTask):
    """The model config, tokenizer and model to fine-tune, patched and wrapped as ``cfg`` asks."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = _base_model(cfg.model, task, cfg.r, cfg.layers)
    config = model.config
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.peft == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets or DEFAULT_LORA_TARGETS),
            modules_to_save=["classifier"],
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:
            raise ConfigError(
                f"--lora-targets must name linear layers of {type(model).__name__}, got {list(lora.target_modules)} "
                f"({error})"
            ) from None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info("LoRA: %d of %d parameters trainable", trainable, total)
    return config, tokenizer, model


def save_finetuned(accelerator: Accelerator, model, tokenizer, target: Path, cfg: FinetuneConfig) -> None:
    """Saves the fine-tuned model to ``target`` atomically; LoRA runs also get the merged model in ``merged/``.

    ``target`` is the run's output folder (its other files are kept) or a folder of its own such as ``best/``.
    """
    whole_folder = target != cfg.resolved_output_dir()
    save_pretrained_atomic(accelerator, model, tokenizer, target, whole_folder=whole_folder)
    if cfg.peft is None:
        return
    if accelerator.is_main_process:
        base = accelerator.unwrap_model(model).get_base_model()
        settings = getattr(base.config, "rsoftmax", None)
        write_json_atomic(
            target / BASE_FILE, {"base_model": cfg.model, "task": get_task(cfg.task).name, "rsoftmax": settings}
        )
    merged = copy.deepcopy(accelerator.unwrap_model(model)).merge_and_unload()
    save_pretrained_atomic(accelerator, merged, tokenizer, target / "merged", whole_folder=True)


def load_finetuned(path: str | Path) -> PreTrainedModel:
    """Loads what a run saved: a full checkpoint, or base model + LoRA adapter; r-softmax restored either way.

    Raises:
        FileNotFoundError: If an adapter folder lacks ``rsoftmax_base.json`` (the base model to put it on).
    """
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return load_model(str(path))
    if not (path / BASE_FILE).is_file():
        raise FileNotFoundError(f"{path} holds a LoRA adapter but no {BASE_FILE} naming its base model")
    from peft import PeftModel

    base = json.loads((path / BASE_FILE).read_text(encoding="utf-8"))
    settings = base["rsoftmax"] or {}
    rates = settings.get("r")
    if rates is not None and any(isinstance(rate, list) for rate in rates):
        rates = torch.tensor([rate if isinstance(rate, list) else [rate] for rate in rates])
    model = _base_model(base["base_model"], get_task(base["task"]), rates, settings.get("layers"))
    return PeftModel.from_pretrained(model, str(path))
