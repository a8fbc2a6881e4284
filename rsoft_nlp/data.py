"""A run's data and its limits: the model source, the token limit, the splits to train, evaluate and predict on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from accelerate.logging import get_logger
from datasets import DatasetDict

from rsoft_nlp.config import FinetuneConfig
from rsoft_nlp.glue import GlueTask, load_glue, subsample, text_pairs
from rsoft_nlp.hub import require_hub

logger = get_logger(__name__)

__all__ = ["load_run_data", "max_length_for", "resolve_model_source", "tokenize_splits"]

# Model types whose position ids start after the padding index, so the position table holds fewer tokens.
_POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "xlm-roberta-xl", "longformer"}


def resolve_model_source(model: str) -> None:
    """Fails fast, naming ``--model``, when the model is neither a local folder nor cached nor reachable."""
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"--model must be a folder holding config.json, got {model!r}")
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip(os.sep).replace("/", "", 1)
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:
        cached, looks_like_path = None, True
    if looks_like_path or Path(model).exists():
        raise FileNotFoundError(f"--model must be an existing checkpoint folder or a Hub id, got {model!r}")
    if isinstance(cached, str):
        return
    require_hub(f"model {model!r}", "pass --model with a local folder that holds the checkpoint and its tokenizer")


def max_length_for(requested: int, tokenizer, config) -> int:
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


def tokenize_splits(splits: DatasetDict, task: GlueTask, tokenizer, max_length: int, test_splits: Sequence[str]):
    def encode(batch):
        first, second = text_pairs(task, batch)
        encoded = tokenizer(first, second, truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    encoded = DatasetDict()
    for split, dataset in splits.items():
        # Test splits keep ``idx`` for the submission file and have no labels.
        drop = [c for c in dataset.column_names if split not in test_splits or c != "idx"]
        encoded[split] = dataset.map(encode, batched=True, remove_columns=drop, desc=f"Tokenizing {split}")
        if split in test_splits:
            encoded[split] = encoded[split].remove_columns("labels")
    return encoded


def load_run_data(cfg: FinetuneConfig, task: GlueTask) -> tuple[DatasetDict, list[str], list[str]]:
    files = {
        split: path
        for split, path in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file))
        if path
    }
    raw = load_glue(task, data_dir=cfg.data_dir, files=files or None)
    eval_splits = [split for split in task.eval_splits if split in raw] or (
        ["validation"] if "validation" in raw else []
    )
    if "train" not in raw or not eval_splits:
        raise FileNotFoundError(f"task {task.name!r} needs a train and an evaluation split, found {list(raw)}")
    test_splits = [split for split in task.test_splits if split in raw] if cfg.do_predict else []
    if cfg.do_predict and not test_splits:
        raise FileNotFoundError(
            f"--do-predict needs the test split(s) {list(task.test_splits)}, found {list(raw)}: give --test-file, "
            "or a --data-dir whose task folder holds the test TSV file(s)"
        )
    raw["train"] = subsample(raw["train"], cfg.max_train_samples)
    # The same limit for every evaluation split (MNLI matched and mismatched alike).
    for split in eval_splits:
        raw[split] = subsample(raw[split], cfg.max_eval_samples)
    for split in test_splits:
        raw[split] = subsample(raw[split], cfg.max_predict_samples)
    return DatasetDict({s: raw[s] for s in ["train", *eval_splits, *test_splits]}), eval_splits, test_splits
