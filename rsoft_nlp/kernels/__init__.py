"""Backends for r-softmax: the pure-PyTorch reference path and fused kernels.

* ``"torch"``: the reference path in :mod:`rsoft_nlp.rsoftmax`, always available, any device.
* ``"cpu"``: a fused C++ kernel for CPU tensors (:mod:`rsoft_nlp.kernels.cpu`), compiled on first use.
* ``"triton"``: a fused Triton kernel (:mod:`rsoft_nlp.kernels.triton_rsoftmax`) for CUDA tensors, or for CPU tensors
  when ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests).
* ``"auto"`` (the default): ``"cpu"`` for CPU tensors and ``"triton"`` for CUDA tensors when they can run, else
  ``"torch"``. The choice and the reason for any fallback are logged once.

The backend is picked per call by the ``backend`` argument of :func:`rsoft_nlp.r_softmax`, else by the environment
variable ``RSOFT_BACKEND``, else ``"auto"``.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from torch import Tensor

from rsoft_nlp.kernels import cpu

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpu", "triton")
ENV_VAR = "RSOFT_BACKEND"
_logged: set[str] = set()

__all__ = ["BACKENDS", "ENV_VAR", "fused_r_softmax", "resolve_backend"]


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def _triton_missing(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device``, or ``None`` when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the Triton kernel runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got a {device.type} tensor"


def resolve_backend(backend: str | None, scores: Tensor) -> str:
    """Picks the backend that will compute r-softmax of ``scores``.

    Args:
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``, or ``None`` to read ``RSOFT_BACKEND``.
        scores: The input; its device decides what ``"auto"`` means.

    Returns:
        ``"torch"``, ``"cpu"`` or ``"triton"``.

    Raises:
        ValueError: If the name is unknown.
        RuntimeError: If a forced backend cannot run on this input.
    """
    compiling = torch.compiler.is_compiling()
    if backend is None:
        backend = "auto" if compiling else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch" or scores.numel() == 0:
        return "torch"

    device = scores.device
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        # NOTE: while torch.compile traces, the extension is used only if an eager call has already loaded it.
        reason = (None if cpu.is_loaded() else "not loaded before tracing") if compiling else cpu.missing_reason()
        if reason is None and device.type == "cpu":
            if not compiling:
                _log_once("r-softmax backend: fused CPU kernel")
            return "cpu"
        reason = reason or f"the fused CPU kernel runs on CPU tensors, got a {device.type} tensor"
    else:
        reason = _triton_missing(device)
        if reason is None:
            if not compiling:
                _log_once(f"r-softmax backend: Triton kernel on {device.type}")
            return "triton"
    if backend != "auto":
        raise RuntimeError(f"`backend` {backend!r} cannot run here: {reason}")
    if not compiling:
        _log_once(f"r-softmax backend: reference PyTorch path on {device.type} ({reason})")
    return "torch"


def fused_r_softmax(scores: Tensor, r: Tensor, dim: int, backend: str, eps: float) -> Tensor:
    """r-softmax through a fused kernel.

    Args:
        scores: Scores, any shape, with keys along ``dim`` (already validated).
        r: Rates of the row shape (``scores.shape`` with 1 at ``dim``), in the compute dtype.
        dim: The keys' dimension, non-negative.
        backend: ``"cpu"`` or ``"triton"``.
        eps: The threshold's offset added to ``-Q_r``.

    Returns:
        Probabilities of the shape and dtype of ``scores``.
    """
    if backend == "cpu":
        op = cpu.r_softmax_cpu
    else:
        from rsoft_nlp.kernels import triton_rsoftmax

        op = triton_rsoftmax.r_softmax_triton
    keys_last = scores.movedim(dim, -1)  # (rows..., k_len)
    k_len = keys_last.shape[-1]
    flat = keys_last.reshape(-1, k_len).contiguous()  # (rows, k_len)
    rates = r.movedim(dim, -1).reshape(-1).contiguous()  # (rows,)
    probs = op(flat, rates, eps)[0]
    return probs.view(keys_last.shape).movedim(-1, dim)  # scores' shape
