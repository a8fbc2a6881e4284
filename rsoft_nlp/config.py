"""The fine-tuning run's settings, as one dataclass that YAML files and command-line flags fill in."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rsoft_nlp.glue import GLUE_TASKS

__all__ = ["ConfigError", "FinetuneConfig", "PEFT_METHODS", "REPORT_TO", "load_yaml"]

MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "all")
PEFT_METHODS = ("lora",)
# Settings left out of run_config.json and every other file a run writes.
SECRET_FIELDS = ("hub_token",)


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
    max_predict_samples: int | None = None
    mixed_precision: str = "no"
    log_every: int = 10
    gradient_checkpointing: bool = False
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume_from: str | None = None
    eval_every: int | None = None
    save_best: bool = False
    early_stopping_patience: int | None = None
    do_predict: bool = False
    report_to: str = "none"
    peft: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: list[str] | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    hub_token: str | None = None

    def _type_problems(self) -> list[str]:
        """Checks each setting's type from its annotation, turning numbers written as text (``2e-5``) into numbers."""
        problems = []
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            flag = "--" + spec.name.replace("_", "-")
            kind = spec.type.split(" | ")[0]
            if value is None:
                if "None" not in spec.type:
                    problems.append(f"{flag} must be set, got None")
                continue
            if kind == "float" and isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                rule = "a finite number"
            elif kind == "int":
                ok, rule = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif kind == "bool":
                ok, rule = isinstance(value, bool), "true or false"
            elif kind == "str":
                ok, rule = isinstance(value, str), "a string"
            else:
                item = int if kind == "list[int]" else str
                ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
                rule = f"a list of {'integers' if item is int else 'strings'}"
            if ok:
                setattr(self, spec.name, float(value) if kind == "float" else value)
            else:
                problems.append(f"{flag} must be {rule}, got {value!r}")
        return problems

    def validate(self) -> FinetuneConfig:
        """Checks every setting and raises one :class:`ConfigError` listing all problems."""
        problems = self._type_problems()
        if problems:
            # The other rules need well-typed values; only the output folder's can still be checked.
            raise ConfigError("invalid settings:\n  " + "\n  ".join(problems + self._output_problems()))

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
        for name in ("batch_size", "grad_accum", "max_length", "log_every", "keep_checkpoints", "lora_rank"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and value >= 1,
                f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}",
            )
        for name in (
            "eval_batch_size",
            "max_train_samples",
            "max_eval_samples",
            "max_predict_samples",
            "checkpoint_every",
            "eval_every",
            "early_stopping_patience",
        ):
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
        check(
            self.report_to in REPORT_TO,
            f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}",
        )
        if self.report_to in ("tensorboard", "wandb", "mlflow"):
            module = "tensorboard" if self.report_to == "tensorboard" else self.report_to
            check(
                importlib.util.find_spec(module) is not None,
                f"--report-to {self.report_to} needs the {module} package (pip install {module}), which is missing",
            )
        check(
            self.peft is None or self.peft in PEFT_METHODS,
            f"--peft must be one of {', '.join(PEFT_METHODS)} (leave it out to train every weight), got {self.peft!r}",
        )
        check(self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        check(
            self.lora_targets is None or (len(self.lora_targets) > 0 and all(self.lora_targets)),
            f"--lora-targets must be module names separated by commas, e.g. query,value, got {self.lora_targets!r}",
        )
        defaults = {spec.name: spec.default for spec in dataclasses.fields(FinetuneConfig)}
        for name in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
            flag = "--" + name.replace("_", "-")
            check(
                self.peft is not None or getattr(self, name) == defaults[name],
                f"{flag} needs --peft lora, got {flag} {getattr(self, name)!r} without it",
            )
        for name in ("hub_model_id", "hub_private", "hub_token"):
            check(
                self.push_to_hub or getattr(self, name) == defaults[name],
                f"--{name.replace('_', '-')} needs --push-to-hub (use rsoft-push for a finished run)",
            )
        check(
            not self.push_to_hub or bool(self.hub_model_id),
            f"--push-to-hub needs --hub-model-id NAME, got {self.hub_model_id!r}",
        )
        check(
            self.resume_from is None or self.resume_from == "latest" or Path(self.resume_from).is_dir(),
            f"--resume-from must be 'latest' or an existing checkpoint folder, got {self.resume_from!r}",
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
        problems += self._output_problems()
        if problems:
            raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))
        return self

    def __repr__(self) -> str:
        # Keeps the token out of tracebacks and logs.
        shown = ", ".join(f"{key}={value!r}" for key, value in self.to_dict().items())
        return f"FinetuneConfig({shown})"

    def _output_problems(self) -> list[str]:
        """The output folder's rule; empty when the settings it is derived from are themselves of the wrong type."""
        typed = isinstance(self.output_dir, (str, type(None))) and isinstance(self.task, str)
        if not typed or not isinstance(self.r, (int, float, type(None))) or isinstance(self.r, bool):
            return []
        output = self.resolved_output_dir()
        if output.exists() and not output.is_dir():
            return [f"--output-dir must be a folder (it may exist), got the file {str(output)!r}"]
        return []

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        rate = "softmax" if self.r is None else f"r{self.r:g}"
        return Path("runs") / f"{self.task.lower()}-{rate}"

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict, without secrets and with the resolved output folder."""
        data = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            data.pop(name)
        data["output_dir"] = str(self.resolved_output_dir())
        return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a run's settings from a YAML file; keys are flag names (``-`` or ``_``).

    Raises:
        ConfigError: If the file cannot be read, is not a YAML mapping or names a setting that does not exist.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as error:
        raise ConfigError(f"--config must be a readable YAML file, got {str(path)!r} ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
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
