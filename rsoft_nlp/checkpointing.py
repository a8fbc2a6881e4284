"""Training checkpoints that survive a kill: written to a temporary folder, renamed into place, the newest k kept.

A checkpoint folder ``<output>/checkpoints/checkpoint-<global_step>`` holds what ``Accelerator.save_state`` writes
(model, optimizer, scheduler, gradient scaler, every process's RNG states) plus ``trainer_state.json``: the epoch,
the micro-batches of that epoch already consumed, the running losses, the evaluation history and the best metric so
far. A folder only gets its final name once complete, so a run killed while writing leaves at worst a
``.tmp-checkpoint-*`` folder, which resuming ignores and the next save removes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)

__all__ = [
    "TRAINER_STATE",
    "find_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_pretrained_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def use_default_permissions(path: Path) -> None:
    """Gives ``path`` (and, for a folder, everything in it) the permissions a plain ``open`` or ``mkdir`` would.

    Temporary files and folders are created private to their owner; results renamed from them should not be.
    """
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(data)
    use_default_permissions(Path(handle.name))
    os.replace(handle.name, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` as UTF-8 to a temporary file beside ``path`` and renames it into place."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _finite_or_none(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_none(value) for value in data]
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes strict JSON (NaN and infinities become ``null``) to a temporary file, then renames it into place."""
    write_text_atomic(path, json.dumps(_finite_or_none(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _replace_dir(staging: Path, target: Path) -> None:
    """Renames ``staging`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint folders under ``checkpoints_dir``, oldest (lowest ``global_step``) first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        path
        for path in checkpoints_dir.iterdir()
        if path.is_dir() and _NAME.match(path.name) and (path / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda path: int(_NAME.match(path.name).group(1)))


def resolve_checkpoint(resume_from: str, checkpoints_dir: Path) -> Path | None:
    """The folder to resume from: ``resume_from`` itself, or the newest complete one for ``"latest"``.

    Returns:
        The checkpoint folder, or ``None`` for ``"latest"`` when there is none yet (the run then starts afresh).

    Raises:
        FileNotFoundError: If ``resume_from`` is a folder without a complete checkpoint.
    """
    if resume_from == "latest":
        found = find_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume-from must name a complete checkpoint folder, got {resume_from!r}")
    return path


def save_checkpoint(
    accelerator: Accelerator, checkpoints_dir: Path, global_step: int, state: dict[str, Any], keep: int
) -> Path:
    """Saves the training state atomically and keeps only the newest ``keep`` checkpoints.

    Every process must call this: ``save_state`` writes each process's RNG states.

    Args:
        accelerator: The run's Accelerator (model, optimizer and scheduler prepared by it).
        checkpoints_dir: Where checkpoint folders live.
        global_step: The optimizer step the checkpoint is taken after; names the folder.
        state: The loop's own state, written to ``trainer_state.json``.
        keep: How many checkpoints to keep, newest first.

    Returns:
        The checkpoint folder.
    """
    final = checkpoints_dir / f"checkpoint-{global_step}"
    staging = checkpoints_dir / f".tmp-checkpoint-{global_step}"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for leftover in checkpoints_dir.glob(".tmp-checkpoint-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(staging / TRAINER_STATE, {**state, "global_step": global_step})
        _replace_dir(staging, final)
        for old in find_checkpoints(checkpoints_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written to %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restores model, optimizer, scheduler and RNG states from ``path`` and returns the loop's state."""
    accelerator.load_state(str(path))
    return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))


def save_pretrained_atomic(accelerator: Accelerator, model, tokenizer, target: Path, whole_folder: bool) -> None:
    """Saves model and tokenizer (main process only) into a temporary folder, then moves them to ``target``.

    Args:
        accelerator: The run's Accelerator.
        model: The (prepared) model.
        tokenizer: Its tokenizer.
        target: The folder to save to.
        whole_folder: Rename the whole folder into place (``target`` holds only the model); otherwise rename each
            saved file into ``target``, keeping the other files there (the run's results).
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # Sharded weights (FSDP, DeepSpeed ZeRO-3) are gathered by every process together.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if not accelerator.is_main_process:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        unwrapped.save_pretrained(staging, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(staging)
        use_default_permissions(staging)
        if whole_folder:
            _replace_dir(staging, target)
            return
        target.mkdir(exist_ok=True)
        for item in staging.iterdir():
            destination = target / item.name
            if destination.is_dir() and item.is_dir():
                shutil.rmtree(destination)
            os.replace(item, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
