"""The GLUE tasks and their data, from the Hub, a local folder in the classic TSV layout, or CSV/JSON files.

Every source yields a ``DatasetDict`` with the same schema: the task's text columns (as named on the Hub, e.g.
``sentence1`` and ``sentence2`` for MRPC), ``label`` (an int class id, or a float score for STS-B; -1 where
the split has no labels) and ``idx``. Splits are ``train``, ``validation`` and ``test``; MNLI has
``validation_matched``, ``validation_mismatched``, ``test_matched`` and ``test_mismatched`` instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from rsoft_nlp.hub import require_hub

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"

__all__ = ["GLUE_TASKS", "HUB_DATASET", "GlueTask", "get_task", "load_glue", "load_glue_files", "load_glue_tsv"]


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Attributes:
        name: The task's name as on the Hub, e.g. ``"mrpc"``.
        text_columns: One or two text columns, named as on the Hub.
        label_names: Class names in id order; empty for the regression task STS-B.
        metric: The task's main metric key (without the ``eval_`` prefix).
        folder: The folder name in the classic TSV layout.
        tsv_columns: For each text column and ``label``, the column header in the classic TSV files.
        eval_splits: The evaluation splits (two for MNLI).
        test_splits: The unlabelled test splits, named as their TSV files' stems map to.
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metric: str
    folder: str
    tsv_columns: dict[str, str]
    eval_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            "matthews_correlation",
            "CoLA",
            {"sentence": "3", "label": "1"},
        ),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), "accuracy", "SST-2", {"sentence": "sentence"}),
        GlueTask(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            "f1",
            "MRPC",
            {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
        ),
        GlueTask(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            "f1",
            "QQP",
            {"question1": "question1", "question2": "question2", "label": "is_duplicate"},
        ),
        GlueTask("stsb", ("sentence1", "sentence2"), (), "pearson", "STS-B", {"label": "score"}),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            "MNLI",
            {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
            eval_splits=("validation_matched", "validation_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
        ),
        GlueTask(
            "qnli",
            ("question", "sentence"),
            ("entailment", "not_entailment"),
            "accuracy",
            "QNLI",
            {"question": "question", "sentence": "sentence"},
        ),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy", "RTE", {}),
        GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy", "WNLI", {}),
    )
}

# Split name -> file stem in the classic layout.
_TSV_FILES = {
    "train": "train",
    "validation": "dev",
    "test": "test",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}


def get_task(name: str) -> GlueTask:
    """Looks a task up by name, case-insensitively and ignoring ``-``: ``"SST-2"`` finds ``sst2``."""
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"`task` must be one of {', '.join(GLUE_TASKS)}, got {name!r}")
    return GLUE_TASKS[key]


def _features(task: GlueTask) -> datasets.Features:
    label = datasets.Value("float32") if task.is_regression else datasets.Value("int64")
    columns = {column: datasets.Value("string") for column in task.text_columns}
    return datasets.Features({**columns, "label": label, "idx": datasets.Value("int64")})


def _label_id(task: GlueTask, raw: str | int | float | None, where: str, required: bool) -> int | float:
    """Maps a raw label (a class name, a class id as text or number, or a score) to the schema's label.

    A missing label is -1, allowed only where ``required`` is False (unlabelled test splits).
    """
    missing = raw is None or (isinstance(raw, float) and math.isnan(raw)) or (isinstance(raw, str) and not raw.strip())
    if missing:
        if required:
            raise ValueError(f"{where}: label is missing; every training and evaluation example needs one")
        return -1.0 if task.is_regression else -1
    if task.is_regression:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label must be a number (a similarity score), got {raw!r}") from None
    if isinstance(raw, str):
        raw = raw.strip()
        if raw in task.label_names:
            return task.label_names.index(raw)
    try:
        label = int(raw)
    except (TypeError, ValueError):
        label = None
    if label is None or not 0 <= label < task.num_labels:
        raise ValueError(
            f"{where}: label must be one of {list(task.label_names)} or a class id in [0, {task.num_labels - 1}], "
            f"got {raw!r}"
        )
    return label


def _read_tsv(path: Path, task: GlueTask, split: str) -> dict[str, list]:
    # NOTE: quoting is off on purpose: GLUE sentences hold unbalanced double quotes that a CSV reader would merge.
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    headerless = task.name == "cola" and split != "test"
    header = [str(i) for i in range(4)] if headerless else lines[0].split("\t")
    rows = lines if headerless else lines[1:]

    def column(name: str) -> int | None:
        for source in (task.tsv_columns.get(name, name), name):
            if source in header:
                return header.index(source)
        return None

    text_index = {name: column(name) for name in task.text_columns}
    missing = [task.tsv_columns.get(name, name) for name, index in text_index.items() if index is None]
    if missing:
        raise ValueError(f"{path}: expected column(s) {missing} for task {task.name!r}, found header {header}")
    label_index = column("label")
    # Example ids: "index" in most files, "id" in QQP's.
    id_index = next((header.index(name) for name in ("index", "id") if name in header), None)
    width = max(index for index in (*text_index.values(), label_index) if index is not None) + 1

    data: dict[str, list] = {name: [] for name in (*task.text_columns, "label", "idx")}
    skipped = 0
    for number, line in enumerate(rows):
        fields = line.split("\t")
        if len(fields) < width:
            skipped += 1
            continue
        for name, index in text_index.items():
            data[name].append(fields[index])
        raw = fields[label_index] if label_index is not None else None
        where = f"{path} line {number + 2 - headerless}"
        data["label"].append(_label_id(task, raw, where, required=not split.startswith("test")))
        data["idx"].append(int(fields[id_index]) if id_index is not None else number)
    if skipped:
        logger.warning("%s: skipped %d malformed row(s)", path, skipped)
    return data


def load_glue_tsv(task: GlueTask | str, data_dir: str | os.PathLike) -> datasets.DatasetDict:
    """Loads a task from a folder in the classic GLUE TSV layout (``<data_dir>/<Task>/{train,dev,test}.tsv``).

    ``data_dir`` may also be the task's own folder. Splits whose file is missing are left out.

    Raises:
        FileNotFoundError: If neither ``data_dir/<Task>`` nor ``data_dir`` itself holds the task's files.
    """
    task = get_task(task) if isinstance(task, str) else task
    root = Path(data_dir)
    folder = root / task.folder if (root / task.folder).is_dir() else root
    splits = {}
    for split in ("train", *task.eval_splits, *task.test_splits):
        path = folder / f"{_TSV_FILES[split]}.tsv"
        if path.is_file():
            splits[split] = datasets.Dataset.from_dict(_read_tsv(path, task, split), features=_features(task))
    if "train" not in splits and not any(split in splits for split in task.eval_splits):
        raise FileNotFoundError(
            f"`--data-dir` must hold {task.folder}/train.tsv and {task.folder}/{_TSV_FILES[task.eval_splits[0]]}.tsv "
            f"in the classic GLUE layout, got {str(root)!r}"
        )
    return datasets.DatasetDict(splits)


def _read_table(path: str, split: str) -> dict[str, list]:
    """Reads a CSV, TSV or JSON (lines) file into columns; TSV is read with quoting off, as GLUE's files need."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in ("csv", "tsv", "json", "jsonl"):
        raise ValueError(f"`--{split}-file` must be a .csv, .tsv, .json or .jsonl file, got {path!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"`--{split}-file` must be an existing file, got {path!r}")
    if suffix == "tsv":
        header, *rows = Path(path).read_text(encoding="utf-8-sig").splitlines()
        names = header.split("\t")
        rows = [row.split("\t") for row in rows if row.strip()]
        return {name: [row[i] if i < len(row) else None for row in rows] for i, name in enumerate(names)}
    builder = "csv" if suffix == "csv" else "json"
    return datasets.load_dataset(builder, data_files={split: path}, split=split).to_dict()


def load_glue_files(task: GlueTask | str, files: dict[str, str]) -> datasets.DatasetDict:
    """Loads a task from local CSV, TSV or JSON (lines) files, one per split.

    The files need the task's text columns (as named on the Hub) and a ``label`` column holding class names, class
    ids or, for STS-B, scores; an ``idx`` column is optional. Only ``test`` files may leave labels out.

    Args:
        task: The task.
        files: Split name (``train``, ``validation``, ``test`` ...) to file path.
    """
    task = get_task(task) if isinstance(task, str) else task
    splits = {}
    for split, path in files.items():
        raw = _read_table(path, split)
        size = len(next(iter(raw.values()), []))
        missing = [column for column in task.text_columns if column not in raw]
        if missing:
            raise ValueError(f"{path}: expected text column(s) {missing} for task {task.name!r}, found {list(raw)}")
        labels = raw.get("label", [None] * size)
        required = not split.startswith("test")
        data = {column: ["" if text is None else str(text) for text in raw[column]] for column in task.text_columns}
        data["label"] = [_label_id(task, label, f"{path} row {i + 1}", required) for i, label in enumerate(labels)]
        data["idx"] = [int(i) for i in raw["idx"]] if "idx" in raw else list(range(size))
        splits[split] = datasets.Dataset.from_dict(data, features=_features(task))
    return datasets.DatasetDict(splits)


def load_glue_hub(task: GlueTask | str) -> datasets.DatasetDict:
    """Loads a task from the Hub (``nyu-mll/glue``), failing fast when offline."""
    task = get_task(task) if isinstance(task, str) else task
    require_hub(
        f"GLUE task {task.name!r} ({HUB_DATASET})",
        "pass --data-dir with a folder in the classic GLUE TSV layout, or --train-file and --validation-file",
    )
    raw = datasets.load_dataset(HUB_DATASET, task.name)
    return datasets.DatasetDict(
        {split: raw[split].cast(_features(task)).select_columns(list(_features(task))) for split in raw}
    )


def load_glue(
    task: GlueTask | str,
    data_dir: str | os.PathLike | None = None,
    files: dict[str, str] | None = None,
) -> datasets.DatasetDict:
    """Loads a GLUE task from local files if given, else from a TSV folder if given, else from the Hub."""
    task = get_task(task) if isinstance(task, str) else task
    if files:
        return load_glue_files(task, files)
    if data_dir is not None:
        return load_glue_tsv(task, data_dir)
    return load_glue_hub(task)


def subsample(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first ``limit`` examples (all if ``limit`` is None or larger than the split)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.select(range(limit))


def text_pairs(task: GlueTask, batch: dict[str, Sequence[str]]) -> tuple[Sequence[str], Sequence[str] | None]:
    """The first and (for pair tasks) second texts of a batch, ready for a tokenizer."""
    first = batch[task.text_columns[0]]
    second = batch[task.text_columns[1]] if len(task.text_columns) > 1 else None
    return first, second
