"""GLUE submission files: predictions on the unlabelled test split in the layout the GLUE server reads.

One ``<Name>.tsv`` per test split with the header ``index\\tprediction``. Tasks whose classic files carry class
names (MNLI, QNLI, RTE) get class names; the others get class ids (0/1); STS-B gets scores clipped to [0, 5].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsoft_nlp.checkpointing import write_text_atomic
from rsoft_nlp.glue import GlueTask

__all__ = ["SUBMISSION_NAMES", "submission_rows", "write_submission"]

# Test split -> the file name the GLUE server expects, per task.
SUBMISSION_NAMES = {
    "cola": {"test": "CoLA"},
    "sst2": {"test": "SST-2"},
    "mrpc": {"test": "MRPC"},
    "qqp": {"test": "QQP"},
    "stsb": {"test": "STS-B"},
    "mnli": {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"},
    "qnli": {"test": "QNLI"},
    "rte": {"test": "RTE"},
    "wnli": {"test": "WNLI"},
}
_NAMED_LABELS = {"mnli", "qnli", "rte"}


def submission_rows(task: GlueTask, predictions: Sequence) -> list[str]:
    """The ``prediction`` column: class names or ids as the server expects, or scores clipped to [0, 5]."""
    predictions = np.asarray(predictions)
    if task.is_regression:
        return [f"{score:.3f}" for score in np.clip(predictions.astype(float), 0.0, 5.0)]
    if task.name in _NAMED_LABELS:
        return [task.label_names[int(label)] for label in predictions]
    return [str(int(label)) for label in predictions]


def write_submission(task: GlueTask, split: str, indices: Sequence[int], predictions: Sequence, out_dir: Path) -> Path:
    """Writes ``<out_dir>/<Name>.tsv`` for one test split atomically and returns its path."""
    rows = submission_rows(task, predictions)
    if len(rows) != len(indices):
        raise ValueError(f"`indices` and `predictions` must have the same length, got {len(indices)} and {len(rows)}")
    path = out_dir / f"{SUBMISSION_NAMES[task.name][split]}.tsv"
    lines = ["index\tprediction", *(f"{int(index)}\t{row}" for index, row in zip(indices, rows, strict=True))]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
