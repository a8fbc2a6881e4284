"""Fine-tuning on a GLUE task with Accelerate: one process, or several GPUs or nodes through ``accelerate launch``.

The loop is AdamW with a linear schedule and warm-up, gradient accumulation through Accelerate, evaluation after each
epoch (and every ``--eval-every`` steps) with ``gather_for_metrics``, checkpoints every ``--checkpoint-every`` steps
that a killed run resumes from, and at the end ``all_results.json``, the resolved ``run_config.json`` and the
fine-tuned model and tokenizer in the output folder. ``global_step`` counts optimizer updates everywhere.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from datasets import DatasetDict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from rsoft_nlp.checkpointing import (
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from rsoft_nlp.config import ConfigError, FinetuneConfig
from rsoft_nlp.data import load_run_data, max_length_for, resolve_model_source, tokenize_splits
from rsoft_nlp.glue import GlueTask, get_task
from rsoft_nlp.metrics import compute_metrics
from rsoft_nlp.modeling import build_model, save_finetuned
from rsoft_nlp.patching import patched_layers, record_sparsity
from rsoft_nlp.predict import write_submission

logger = get_logger(__name__)

__all__ = ["finetune", "resolve_model_source", "write_json_atomic"]


def _predict(model, dataloader, accelerator: Accelerator, task: GlueTask, with_labels: bool = True):
    """Predictions (and labels or ``idx``) over a whole split, each example once, in dataset order."""
    model.eval()
    predictions, others = [], []
    for batch in dataloader:
        other = batch.pop("labels") if with_labels else batch.pop("idx")
        with torch.no_grad():
            logits = model(**batch).logits
        preds = logits.squeeze(-1).float() if task.is_regression else logits.argmax(dim=-1)
        preds, other = accelerator.gather_for_metrics((preds, other))
        predictions.append(preds.cpu())
        others.append(other.cpu())
    model.train()
    return torch.cat(predictions).numpy(), torch.cat(others).numpy()


def _evaluate(model, dataloader, accelerator: Accelerator, task: GlueTask) -> tuple[dict[str, float], dict]:
    """Task metrics over the whole split, each example scored once, and the achieved sparsity per layer."""
    started = time.perf_counter()
    with record_sparsity(accelerator.unwrap_model(model)) as stats:
        predictions, references = _predict(model, dataloader, accelerator, task)
    runtime = time.perf_counter() - started
    metrics = compute_metrics(task, predictions, references)
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
    return metrics, sparsity


def _eval_prefix(split: str) -> str:
    # MNLI follows the usual convention: matched under eval_*, mismatched under eval_mm_*.
    return "eval_" if split in ("validation", "validation_matched") else "eval_mm_"


def _param_groups(model, weight_decay: float) -> list[dict]:
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias")
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name.endswith(no_decay) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _make_accelerator(cfg: FinetuneConfig, output_dir: Path) -> Accelerator:
    """The run's Accelerator; under a launcher on a machine without accelerators, a gloo process group on CPUs.

    Raises:
        RuntimeError: If the launcher started several processes but they did not join one process group.
    """
    trackers = None if cfg.report_to == "none" else cfg.report_to
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Accelerate only forms a CPU process group when told to run on CPU; torchrun does not tell it.
    cpu_only = launched > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(
        cpu=cpu_only,
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The shuffle order is a function of (seed, epoch) only, so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate sees {accelerator.num_processes}: "
            "each would train alone and overwrite the others' files; launch with `accelerate launch` or torchrun "
            "on a machine whose accelerators Accelerate can use"
        )
    return accelerator


def _tracker_config(cfg: FinetuneConfig) -> dict[str, Any]:
    # Trackers take scalars and strings only.
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value)
        for key, value in cfg.to_dict().items()
    }


@dataclass
class LoopState:
    """What the loop needs to continue after a restart; saved in every checkpoint.

    Attributes:
        epoch: The epoch in progress (0-based).
        batches_done: Micro-batches of that epoch already consumed, per process.
        global_step: Optimizer updates so far.
        loss_sum / loss_batches: Training loss since the last evaluation (mean over processes, summed over
            micro-batches), and the number of micro-batches it sums.
        log_sum / log_batches: The same since the last log line.
        history: One entry per evaluation.
        best_metric / best_step: The best value of the task's main metric and the step it was reached at.
        evals_without_improvement: For early stopping.
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    loss_batches: int = 0
    log_sum: float = 0.0
    log_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    train_runtime: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


class _Run:
    """One fine-tuning run: the prepared objects and the loop over them."""

    def __init__(self, cfg: FinetuneConfig, accelerator: Accelerator, callbacks: Sequence[Any]):
        self.cfg = cfg
        self.accelerator = accelerator
        self.callbacks = list(callbacks)
        self.task = get_task(cfg.task)
        self.output_dir = cfg.resolved_output_dir()
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.state = LoopState()
        self.runtime_before = 0.0
        self.session_started = time.perf_counter()
        self.stop_early = False
        # Stays empty when a run resumed from its final checkpoint evaluates nothing more.
        self.last_sparsity: dict = {}

    def _call(self, hook: str, **info) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(**info)

    def setup(self, raw: DatasetDict, eval_splits: list[str], test_splits: list[str]) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        self.eval_splits, self.test_splits = eval_splits, test_splits
        self.model_config, self.tokenizer, model = build_model(cfg, self.task)
        self.max_length = max_length_for(cfg.max_length, self.tokenizer, self.model_config)
        with accelerator.main_process_first():
            self.encoded = tokenize_splits(raw, self.task, self.tokenizer, self.max_length, test_splits)

        pad_multiple = 8 if accelerator.mixed_precision != "no" else None
        collator = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=pad_multiple)

        def loader(split: str, shuffle: bool, batch_size: int) -> DataLoader:
            # Each loader draws from its own generator, never from the global RNG that dropout uses.
            generator = torch.Generator().manual_seed(cfg.seed)
            return DataLoader(
                self.encoded[split], shuffle=shuffle, collate_fn=collator, batch_size=batch_size, generator=generator
            )

        eval_batch = cfg.eval_batch_size or cfg.batch_size
        loaders = [loader("train", True, cfg.batch_size)]
        loaders += [loader(split, False, eval_batch) for split in [*eval_splits, *test_splits]]
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.model, self.optimizer, self.train_loader, *prepared = accelerator.prepare(model, optimizer, *loaders)
        self.eval_loaders = dict(zip(eval_splits, prepared[: len(eval_splits)], strict=True))
        self.test_loaders = dict(zip(test_splits, prepared[len(eval_splits) :], strict=True))

        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.max_steps = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.max_steps)
        # The prepared scheduler advances once per process at each optimizer step, hence the factor.
        processes = accelerator.num_processes
        scheduler = get_linear_schedule_with_warmup(
            self.optimizer, self.warmup_steps * processes, self.max_steps * processes
        )
        self.scheduler = accelerator.prepare(scheduler)
        self.patched = patched_layers(accelerator.unwrap_model(self.model))

    def log_summary(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        total_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
        eval_sizes = ", ".join(f"{len(self.encoded[split])} ({split})" for split in self.eval_splits)
        patched = self.patched
        attention = f"r-softmax, r = {cfg.r:g}, patched layers = {sorted(patched)}" if patched else "softmax"
        summary = [
            "***** Fine-tuning *****",
            f"task = {self.task.name}, model = {cfg.model}" + (f", {cfg.peft} adapters" if cfg.peft else ""),
            f"train examples = {len(self.encoded['train'])}, eval examples = {eval_sizes}",
            f"epochs = {cfg.epochs:g}, batch size per process = {cfg.batch_size}, "
            f"processes = {accelerator.num_processes}",
            f"accumulation = {cfg.grad_accum}, batch per optimizer step = {total_batch}",
            f"optimizer steps = {self.max_steps} ({self.steps_per_epoch} per epoch, {self.warmup_steps} warm-up)",
            f"max length = {self.max_length}, attention = {attention}",
            f"output = {self.output_dir}",
        ]
        logger.info("\n  ".join(summary), main_process_only=True)

    def resume(self) -> None:
        if self.cfg.resume_from is None:
            return
        path = resolve_checkpoint(self.cfg.resume_from, self.checkpoints_dir)
        if path is None:
            logger.warning(f"--resume-from latest: no checkpoint in {self.checkpoints_dir} yet, starting afresh")
            return
        state = LoopState(**load_checkpoint(self.accelerator, path))
        changed = {
            key: (state.settings[key], value)
            for key, value in self.resume_settings().items()
            if key in state.settings and state.settings[key] != value
        }
        if changed:
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ConfigError(
                f"--resume-from must name a checkpoint of a run with the same settings, got {path} with {listed}; "
                "resume with the settings it was written with, or start a new run in another --output-dir"
            )
        self.state = state
        self.runtime_before = state.train_runtime
        logger.info(
            f"resumed from {path}: step {self.state.global_step}, epoch {self.state.epoch + 1}, "
            f"{self.state.batches_done} batches into it"
        )

    def evaluate(self, epoch: float) -> dict[str, Any]:
        state = self.state
        entry = {
            "epoch": round(epoch, 4),
            "global_step": state.global_step,
            "train_loss": state.loss_sum / max(state.loss_batches, 1),
        }
        sparsity = {}
        for split, loader in self.eval_loaders.items():
            metrics, sparsity_split = _evaluate(self.model, loader, self.accelerator, self.task)
            entry.update({f"{_eval_prefix(split)}{key}": value for key, value in metrics.items()})
            sparsity = sparsity or sparsity_split
        if sparsity:
            entry["eval_attention_sparsity"] = sparsity["overall"]
            # String keys, as JSON has them, so that a resumed run's history reads the same.
            entry["eval_attention_sparsity_per_layer"] = {str(i): v for i, v in sparsity["per_layer"].items()}
        self.last_sparsity = sparsity
        state.history.append(entry)
        state.loss_sum, state.loss_batches = 0.0, 0

        # The training loss goes to trackers with every log line, not again here.
        scalars = {
            k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("global_step", "train_loss")
        }
        scalars.update({f"eval_attention_sparsity_layer_{i}": v for i, v in sparsity.get("per_layer", {}).items()})
        self.accelerator.log(scalars, step=state.global_step)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k.startswith("eval_") and isinstance(v, float))
        logger.info(f"step {state.global_step} (epoch {epoch:.2f}): {shown}")
        self._track_best(entry)
        return entry

    def _track_best(self, entry: dict[str, Any]) -> None:
        state, cfg = self.state, self.cfg
        value = entry.get(f"eval_{self.task.metric}")
        if value is None or math.isnan(value):
            return
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
            if cfg.save_best:
                save_finetuned(self.accelerator, self.model, self.tokenizer, self.output_dir / "best", cfg)
                logger.info(f"new best {self.task.metric} {value:.4f} at step {state.global_step}, saved to best/")
            return
        state.evals_without_improvement += 1
        patience = cfg.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            logger.info(f"early stopping: {patience} evaluation(s) without a better {self.task.metric}")
            self.stop_early = True

    def resume_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        cfg = self.cfg
        keys = (
            "task",
            "model",
            "r",
            "layers",
            "peft",
            "epochs",
            "batch_size",
            "grad_accum",
            "max_length",
            "seed",
            "max_train_samples",
        )
        return {key: getattr(cfg, key) for key in keys} | {"processes": self.accelerator.num_processes}

    def elapsed(self) -> float:
        """Training time of the whole run, resumed parts included."""
        return self.runtime_before + time.perf_counter() - self.session_started

    def _checkpoint(self) -> None:
        state = self.state
        state.settings, state.train_runtime = self.resume_settings(), self.elapsed()
        save_checkpoint(
            self.accelerator, self.checkpoints_dir, state.global_step, vars(state).copy(), self.cfg.keep_checkpoints
        )

    def _after_optimizer_step(self, group_loss: torch.Tensor, group_batches: int, index: int) -> None:
        """Bookkeeping after each optimizer step: losses, logs, evaluation and checkpoints."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        state.global_step += 1
        # Mean over processes of this step's summed micro-batch losses.
        step_loss = float(accelerator.reduce(group_loss, "mean"))
        state.loss_sum += step_loss
        state.log_sum += step_loss
        state.loss_batches += group_batches
        state.log_batches += group_batches
        lr = self.scheduler.get_last_lr()[0]
        self._call("on_step_end", global_step=state.global_step, lr=lr)
        self.progress.update(1)

        if state.global_step % cfg.log_every == 0 or state.global_step == self.max_steps:
            mean_loss = state.log_sum / max(state.log_batches, 1)
            self.progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            logger.info(f"step {state.global_step}: loss {mean_loss:.4f}, lr {lr:.3e}")
            accelerator.log({"train_loss": mean_loss, "learning_rate": lr}, step=state.global_step)
            state.log_sum, state.log_batches = 0.0, 0

        end_of_epoch = index + 1 == len(self.train_loader)
        state.batches_done = index + 1
        if end_of_epoch:
            state.epoch, state.batches_done = state.epoch + 1, 0
        if end_of_epoch or (cfg.eval_every and state.global_step % cfg.eval_every == 0):
            epoch = state.epoch + state.batches_done / len(self.train_loader)
            self.evaluate(epoch)
        if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
            self._checkpoint()

    def train(self) -> None:
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        self.progress = tqdm(
            total=self.max_steps,
            initial=state.global_step,
            disable=not accelerator.is_local_main_process,
            desc="Fine-tuning",
        )
        self.model.train()
        micro_batches = len(self.train_loader)
        while state.global_step < self.max_steps and not self.stop_early:
            self.train_loader.set_epoch(state.epoch)
            skip = state.batches_done
            loader = accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            group_loss, group_batches = torch.zeros((), device=accelerator.device), 0
            for index, batch in enumerate(loader, start=skip):
                self._call("on_micro_batch", global_step=state.global_step, batch=batch)
                # The last group of an epoch may be short: scale so that its gradient is the mean over its own batches.
                group_start = index - index % cfg.grad_accum
                group_size = min(cfg.grad_accum, micro_batches - group_start)
                with accelerator.accumulate(self.model):
                    loss = self.model(**batch).loss
                    accelerator.backward(loss * (cfg.grad_accum / group_size))
                    if accelerator.sync_gradients:
                        self._call("before_optimizer_step", global_step=state.global_step, model=self.model)
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                group_loss += loss.detach().float()
                group_batches += 1
                if accelerator.sync_gradients:
                    self._after_optimizer_step(group_loss, group_batches, index)
                    group_loss, group_batches = torch.zeros_like(group_loss), 0
                    if state.global_step >= self.max_steps or self.stop_early:
                        break
        if not state.history or state.history[-1]["global_step"] != state.global_step:
            self.evaluate(state.epoch + state.batches_done / micro_batches)
        self.progress.close()

    def predict(self) -> list[str]:
        written = []
        for split, loader in self.test_loaders.items():
            predictions, indices = _predict(self.model, loader, self.accelerator, self.task, with_labels=False)
            if self.accelerator.is_main_process:
                path = write_submission(self.task, split, indices, predictions, self.output_dir / "predictions")
                written.append(str(path))
                logger.info(f"{split}: {len(indices)} predictions written to {path}")
        return written


def finetune(cfg: FinetuneConfig, accelerator: Accelerator | None = None, callbacks: Sequence[Any] = ()) -> dict:
    """Fine-tunes ``cfg.model`` on ``cfg.task`` and writes results, config and model to the output folder.

    Args:
        cfg: The run's settings (validated here).
        accelerator: An Accelerator to use; one is made from ``cfg`` if ``None``.
        callbacks: Objects observing the loop, for tests and experiments; each may define
            ``on_micro_batch(global_step, batch)``, ``before_optimizer_step(global_step, model)`` (gradients are
            complete and not yet clipped) and ``on_step_end(global_step, lr)``. An exception raised in one stops the
            run as a crash would.

    Returns:
        The results written to ``all_results.json``.
    """
    cfg.validate()
    task = get_task(cfg.task)
    output_dir = cfg.resolved_output_dir()
    resolve_model_source(cfg.model)
    raw, eval_splits, test_splits = load_run_data(cfg, task)
    if cfg.push_to_hub:
        from rsoft_nlp.publish import check_write_access

        # Before any training, on every process, so that all of them stop together.
        check_write_access(cfg.hub_model_id, cfg.hub_token, private=cfg.hub_private)

    accelerator = accelerator or _make_accelerator(cfg, output_dir)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, accelerator, callbacks)
    run.setup(raw, eval_splits, test_splits)
    if cfg.report_to != "none":
        accelerator.init_trackers(f"{task.name}-finetune", config=_tracker_config(cfg))
    run.log_summary()
    run.resume()

    run.session_started = time.perf_counter()
    run.train()
    train_runtime = run.elapsed()
    save_finetuned(accelerator, run.model, run.tokenizer, output_dir, cfg)
    predictions = run.predict() if test_splits else []

    state, history = run.state, run.state.history
    train_samples = len(run.encoded["train"])
    results = {
        "task": task.name,
        "model": cfg.model,
        "r": cfg.r,
        "patched_layers": sorted(run.patched),
        "peft": cfg.peft,
        "epoch": history[-1]["epoch"],
        "global_step": state.global_step,
        "train_loss": sum(h["train_loss"] for h in history) / len(history),
        "train_samples": train_samples,
        "train_runtime": round(train_runtime, 3),
        "train_samples_per_second": round(train_samples * history[-1]["epoch"] / max(train_runtime, 1e-9), 3),
        **{k: v for k, v in history[-1].items() if k.startswith("eval_")},
        "attention_sparsity": run.last_sparsity or None,
        "best_metric": state.best_metric,
        "best_global_step": state.best_step,
        "metric": task.metric,
        "early_stopped": run.stop_early,
        "predictions": predictions,
        "history": history,
    }
    if accelerator.is_main_process:
        write_json_atomic(output_dir / "run_config.json", cfg.to_dict() | {"max_length_used": run.max_length})
        write_json_atomic(output_dir / "all_results.json", results)
        logger.info(f"results written to {output_dir / 'all_results.json'}")
    accelerator.wait_for_everyone()
    if cfg.report_to != "none":
        accelerator.end_training()
    if cfg.push_to_hub and accelerator.is_main_process:
        from rsoft_nlp.publish import push_run

        url = push_run(output_dir, cfg.hub_model_id, token=cfg.hub_token, private=cfg.hub_private)
        logger.info(f"pushed to {url}")
    accelerator.wait_for_everyone()
    return results
