"""The fine-tuning run's settings, as one dataclass that YAML files and command-line flags fill in."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rsoft_nlp.glue import GLUE_TASKS

__all__ = ["ConfigError", "FinetuneConfig", "load_yaml"]

MIXED_PRECISION = ("no", "fp16", "bf16")


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists every problem found."""


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run. Field names are the command-line flags with ``_`` for ``-``.

    ``r`` is the sparsity rate of r-softmax; ``None`` runs plain softmax. ``batch_size`` is per process, so the
    batch per optimizer step is ``batch_size * processes * grad_accum``.
    """

    task: str = "mrpc"
    model: str = "bert-base-uncased"
    r: float | None = None
    layers: list[int] | None = None
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    output_dir: str | None = None
    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    max_length: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    mixed_precision: str = "no"
    log_every: int = 10

    def validate(self) -> FinetuneConfig:
        """Checks every setting and raises one :class:`ConfigError` listing all problems."""
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        check(
            self.task.lower().replace("-", "") in GLUE_TASKS,
            f"--task must be one of {', '.join(GLUE_TASKS)}, got {self.task!r}",
        )
        check(
            self.r is None or (isinstance(self.r, (int, float)) and not math.isnan(self.r) and 0 <= self.r <= 1),
            f"--r must be a number in [0, 1] (leave it out for plain softmax), got {self.r!r}",
        )
        check(
            self.layers is None or all(isinstance(i, int) for i in self.layers),
            f"--layers must be a list of layer indices, got {self.layers!r}",
        )
        check(self.layers is None or self.r is not None, "--layers needs --r: without a rate nothing is patched")
        check(self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        for name in ("batch_size", "grad_accum", "max_length", "log_every"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and value >= 1,
                f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}",
            )
        for name in ("eval_batch_size", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, int) and value >= 1),
                f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}",
            )
        check(0 <= self.warmup_ratio < 1, f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        check(
            self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}"
        )
        check(
            self.mixed_precision in MIXED_PRECISION,
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
        )
        if self.data_dir is not None:
            check(Path(self.data_dir).is_dir(), f"--data-dir must be an existing folder, got {self.data_dir!r}")
        for name in ("train_file", "validation_file", "test_file"):
            value = getattr(self, name)
            check(
                value is None or Path(value).is_file(),
                f"--{name.replace('_', '-')} must be an existing file, got {value!r}",
            )
        check(
            (self.train_file is None) == (self.validation_file is None),
            "--train-file and --validation-file must be given together",
        )
        check(
            self.data_dir is None or self.train_file is None,
            "--data-dir and --train-file/--validation-file are two data sources: give one",
        )
        if problems:
            raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))
        return self

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        rate = "softmax" if self.r is None else f"r{self.r:g}"
        return Path("runs") / f"{self.task.lower()}-{rate}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["output_dir"] = str(self.resolved_output_dir())
        return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a run's settings from a YAML file; keys are flag names (``-`` or ``_``).

    Raises:
        ConfigError: If the file is not a mapping or names a setting that does not exist.
    """
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config must be a YAML mapping of settings, got {type(data).__name__} in {path}")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    settings = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown setting(s) {', '.join(unknown)}; known are {', '.join(sorted(known))}"
        )
    return settings
