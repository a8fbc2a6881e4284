"""Fine-tuning on a GLUE task with Accelerate: one process, or several GPUs or nodes through ``accelerate launch``.

The loop is AdamW with a linear schedule and warm-up, gradient accumulation through Accelerate, evaluation after each
epoch with ``gather_for_metrics``, and at the end ``all_results.json``, the resolved ``run_config.json`` and the
fine-tuned model and tokenizer in the output folder. ``global_step`` counts optimizer updates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import DatasetDict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)

from rsoft_nlp.config import FinetuneConfig
from rsoft_nlp.glue import GlueTask, get_task, load_glue, subsample, text_pairs
from rsoft_nlp.hub import require_hub
from rsoft_nlp.metrics import compute_metrics
from rsoft_nlp.patching import patch_model, patched_layers, record_sparsity

logger = get_logger(__name__)

__all__ = ["finetune", "resolve_model_source", "write_json_atomic"]

# Model types whose position ids start after the padding index, so the position table holds fewer tokens.
_POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "xlm-roberta-xl", "longformer"}


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON to a temporary file beside ``path`` and renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(handle.name, path)


def resolve_model_source(model: str) -> None:
    """Fails fast, naming ``--model``, when the model is neither a local folder nor cached nor reachable."""
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"--model must be a folder holding config.json, got {model!r}")
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return
    require_hub(f"model {model!r}", "pass --model with a local folder that holds the checkpoint and its tokenizer")


def _max_length(requested: int, tokenizer, config) -> int:
    limits = {"--max-length": requested}
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        limits["the tokenizer's model_max_length"] = tokenizer.model_max_length
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        offset = (config.pad_token_id or 0) + 1 if config.model_type in _POSITION_OFFSET_TYPES else 0
        limits["the model's position table"] = positions - offset
    source, length = min(limits.items(), key=lambda item: item[1])
    if length < requested:
        logger.warning(f"--max-length {requested} capped to {length} by {source}")
    return length


def _tokenize(splits: DatasetDict, task: GlueTask, tokenizer, max_length: int):
    def encode(batch):
        first, second = text_pairs(task, batch)
        encoded = tokenizer(first, second, truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    columns = splits["train"].column_names
    return splits.map(encode, batched=True, remove_columns=columns, desc="Tokenizing")


def _evaluate(model, dataloader, accelerator: Accelerator, task: GlueTask) -> tuple[dict[str, float], dict]:
    """Task metrics over the whole split, each example scored once, and the achieved sparsity per layer."""
    model.eval()
    predictions, references = [], []
    started = time.perf_counter()
    with record_sparsity(accelerator.unwrap_model(model)) as stats:
        for batch in dataloader:
            with torch.no_grad():
                logits = model(**batch).logits
            preds = logits.squeeze(-1) if task.is_regression else logits.argmax(dim=-1)
            preds, labels = accelerator.gather_for_metrics((preds, batch["labels"]))
            predictions.append(preds.float().cpu() if task.is_regression else preds.cpu())
            references.append(labels.cpu())
    runtime = time.perf_counter() - started

    predictions, references = torch.cat(predictions), torch.cat(references)
    metrics = compute_metrics(task, predictions.numpy(), references.numpy())
    metrics.update(
        samples=len(references), runtime=round(runtime, 3), samples_per_second=round(len(references) / runtime, 3)
    )

    sparsity = {}
    if stats.zeros:
        layers = sorted(stats.zeros)
        # (layers, heads) summed over processes
        zeros = accelerator.reduce(torch.stack([stats.zeros[i] for i in layers]).to(accelerator.device), "sum")
        keys = accelerator.reduce(torch.stack([stats.keys[i] for i in layers]).to(accelerator.device), "sum")
        per_layer = (zeros.sum(-1) / keys.sum(-1).clamp_min(1)).tolist()
        sparsity = {
            "overall": float(zeros.sum() / keys.sum().clamp_min(1)),
            "per_layer": dict(zip(layers, per_layer, strict=True)),
            "per_head": dict(zip(layers, (zeros / keys.clamp_min(1)).tolist(), strict=True)),
        }
    model.train()
    return metrics, sparsity


def _eval_prefix(split: str) -> str:
    # MNLI follows the usual convention: matched under eval_*, mismatched under eval_*_mm.
    return "eval_" if split in ("validation", "validation_matched") else "eval_mm_"


def _param_groups(model, weight_decay: float) -> list[dict]:
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias")
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name.endswith(no_decay) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _save_model(accelerator: Accelerator, model, tokenizer, output_dir: Path) -> None:
    """Saves model and tokenizer into a temporary folder, then renames each file into ``output_dir``."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if not accelerator.is_main_process:
        return
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=output_dir))
    try:
        unwrapped.save_pretrained(staging, save_function=accelerator.save)
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            target = output_dir / item.name
            if target.is_dir() and item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def finetune(cfg: FinetuneConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Fine-tunes ``cfg.model`` on ``cfg.task`` and writes results, config and model to the output folder.

    Args:
        cfg: The run's settings (validated here).
        accelerator: An Accelerator to use; one is made from ``cfg`` if ``None``.

    Returns:
        The results written to ``all_results.json``.
    """
    cfg.validate()
    task = get_task(cfg.task)
    output_dir = cfg.resolved_output_dir()
    files = {
        split: path
        for split, path in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file))
        if path
    }
    resolve_model_source(cfg.model)
    raw = load_glue(task, data_dir=cfg.data_dir, files=files or None)
    eval_splits = [split for split in task.eval_splits if split in raw] or (
        ["validation"] if "validation" in raw else []
    )
    if "train" not in raw or not eval_splits:
        raise FileNotFoundError(f"task {task.name!r} needs a train and an evaluation split, found {list(raw)}")

    accelerator = accelerator or Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    label_kwargs = (
        {"num_labels": 1, "problem_type": "regression"}
        if task.is_regression
        else {
            "num_labels": task.num_labels,
            "id2label": dict(enumerate(task.label_names)),
            "label2id": {name: i for i, name in enumerate(task.label_names)},
            "problem_type": "single_label_classification",
        }
    )
    config = AutoConfig.from_pretrained(cfg.model, finetuning_task=task.name, **label_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model, config=config, ignore_mismatched_sizes=True)
    if cfg.r is not None:
        patch_model(model, r=cfg.r, layers=cfg.layers)

    max_length = _max_length(cfg.max_length, tokenizer, config)
    raw["train"] = subsample(raw["train"], cfg.max_train_samples)
    for split in eval_splits:
        raw[split] = subsample(raw[split], cfg.max_eval_samples)
    with accelerator.main_process_first():
        encoded = _tokenize(DatasetDict({s: raw[s] for s in ["train", *eval_splits]}), task, tokenizer, max_length)

    pad_multiple = 8 if accelerator.mixed_precision != "no" else None
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple)
    train_loader = DataLoader(encoded["train"], shuffle=True, collate_fn=collator, batch_size=cfg.batch_size)
    eval_loaders = {
        split: DataLoader(encoded[split], collate_fn=collator, batch_size=cfg.eval_batch_size or cfg.batch_size)
        for split in eval_splits
    }

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    model, optimizer, train_loader, *prepared = accelerator.prepare(
        model, optimizer, train_loader, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, prepared, strict=True))

    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    max_steps = math.ceil(cfg.epochs * steps_per_epoch)
    warmup_steps = math.ceil(cfg.warmup_ratio * max_steps)
    # The prepared scheduler advances once per process at each optimizer step, hence the factor.
    scheduler = get_linear_schedule_with_warmup(
        optimizer, warmup_steps * accelerator.num_processes, max_steps * accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)

    patched = patched_layers(accelerator.unwrap_model(model))
    total_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    eval_sizes = ", ".join(f"{len(encoded[split])} ({split})" for split in eval_splits)
    attention = f"r-softmax, r = {cfg.r:g}, patched layers = {sorted(patched)}" if patched else "softmax"
    summary = [
        "***** Fine-tuning *****",
        f"task = {task.name}, model = {cfg.model}",
        f"train examples = {len(encoded['train'])}, eval examples = {eval_sizes}",
        f"epochs = {cfg.epochs:g}, batch size per process = {cfg.batch_size}, processes = {accelerator.num_processes}",
        f"accumulation = {cfg.grad_accum}, batch per optimizer step = {total_batch}",
        f"optimizer steps = {max_steps} ({steps_per_epoch} per epoch, {warmup_steps} warm-up)",
        f"max length = {max_length}, attention = {attention}",
        f"output = {output_dir}",
    ]
    logger.info("\n  ".join(summary), main_process_only=True)

    history = []
    global_step = 0
    started = time.perf_counter()
    progress = tqdm(total=max_steps, disable=not accelerator.is_local_main_process, desc="Fine-tuning")
    model.train()
    epochs = math.ceil(cfg.epochs)
    window_loss, window_batches = torch.zeros((), device=accelerator.device), 0
    for epoch in range(epochs):
        epoch_loss, epoch_batches = torch.zeros((), device=accelerator.device), 0
        micro_batches = len(train_loader)
        for index, batch in enumerate(train_loader):
            if global_step >= max_steps:
                break
            # The last group of an epoch may be short: scale so that its gradient is the mean over its own batches.
            group_start = index - index % cfg.grad_accum
            group_size = min(cfg.grad_accum, micro_batches - group_start)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss * (cfg.grad_accum / group_size))
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

            window_loss += loss.detach().float()
            window_batches += 1
            epoch_loss += loss.detach().float()
            epoch_batches += 1
            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                if global_step % cfg.log_every == 0 or global_step == max_steps:
                    mean_loss = float(accelerator.reduce(window_loss, "mean")) / window_batches
                    lr = scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    logger.info(f"step {global_step}: loss {mean_loss:.4f}, lr {lr:.3e}")
                    window_loss, window_batches = torch.zeros_like(window_loss), 0

        train_loss = float(accelerator.reduce(epoch_loss, "mean")) / max(epoch_batches, 1)
        epoch_metrics = {"epoch": epoch + 1, "global_step": global_step, "train_loss": train_loss}
        sparsity = {}
        for split, loader in eval_loaders.items():
            metrics, sparsity_split = _evaluate(model, loader, accelerator, task)
            prefix = _eval_prefix(split)
            epoch_metrics.update({f"{prefix}{key}": value for key, value in metrics.items()})
            sparsity = sparsity or sparsity_split
        if sparsity:
            epoch_metrics["eval_attention_sparsity"] = sparsity["overall"]
        history.append(epoch_metrics)
        logger.info(
            f"epoch {epoch + 1}: "
            + ", ".join(
                f"{k} {v:.4f}" for k, v in epoch_metrics.items() if k.startswith("eval_") and isinstance(v, float)
            )
        )
    progress.close()
    train_runtime = time.perf_counter() - started

    _save_model(accelerator, model, tokenizer, output_dir)
    results = {
        "task": task.name,
        "model": cfg.model,
        "r": cfg.r,
        "patched_layers": sorted(patched),
        "epoch": history[-1]["epoch"],
        "global_step": global_step,
        "train_loss": sum(h["train_loss"] for h in history) / len(history),
        "train_samples": len(encoded["train"]),
        "train_runtime": round(train_runtime, 3),
        "train_samples_per_second": round(len(encoded["train"]) * cfg.epochs / train_runtime, 3),
        **{k: v for k, v in history[-1].items() if k.startswith("eval_")},
        "attention_sparsity": sparsity or None,
        "history": history,
    }
    if accelerator.is_main_process:
        write_json_atomic(output_dir / "run_config.json", cfg.to_dict() | {"max_length_used": max_length})
        write_json_atomic(output_dir / "all_results.json", results)
        logger.info(f"results written to {output_dir / 'all_results.json'}")
    accelerator.wait_for_everyone()
    return results
