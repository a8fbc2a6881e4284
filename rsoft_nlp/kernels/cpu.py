"""The fused CPU kernel: a C++ extension compiled on first use and exposed as the op ``rsoft_nlp::r_softmax_cpu``.

The extension is built with ``torch.utils.cpp_extension.load`` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default under ``~/.cache/torch_extensions``); the first build takes about a minute, later imports reuse it.
"""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from rsoft_nlp.kernels._ops import define_fused_op

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("rsoftmax_cpu.cpp")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None


def _isa() -> str:
    """``"avx2"`` when torch runs AVX2 (or AVX-512) kernels on this CPU, else ``"base"``."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "avx2" if capability in ("AVX2", "AVX512") and platform.machine() in ("x86_64", "AMD64") else "base"


def _build_flags(isa: str) -> list[str]:
    # NOTE: no -march=native, so a shared extension cache never holds code for another CPU: the build is named after
    # the ISA it targets. -ffp-contract=off keeps a * b + c rounded as two ops, as the reference path computes it;
    # -fno-trapping-math only lets the compiler turn the kernel's selects into vector blends (values are unchanged).
    return _FLAGS + (["-mavx2", "-mfma"] if isa == "avx2" else [])


def toolchain_missing() -> str | None:
    """Returns why the extension cannot be built here, or ``None`` when a compiler and ninja are on the path."""
    if not sys.platform.startswith("linux"):
        return f"the fused CPU kernel is built for Linux only, this is {sys.platform}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ or g++) on PATH"
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError:  # pragma: no cover - torch always ships it
        return "torch.utils.cpp_extension is unavailable"
    if not is_ninja_available():
        return "ninja is not installed"
    return None


def load() -> ModuleType:
    """Builds (first use) or loads the extension and returns it.

    Raises:
        RuntimeError: If the toolchain is missing or the build fails; the reason is remembered and raised again.
    """
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _failure is None:
            _failure = toolchain_missing()
        if _failure is not None:
            raise RuntimeError(_failure)
        from torch.utils.cpp_extension import load as load_extension

        isa = _isa()
        logger.info("Loading the fused r-softmax CPU kernel for %s (compiled on first use, cached afterwards)", isa)
        try:
            _module = load_extension(
                name=f"rsoft_nlp_rsoftmax_cpu_{isa}",
                sources=[str(_SOURCE)],
                extra_cflags=_build_flags(isa),
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - any build failure means "use the reference path"
            _failure = f"building the fused CPU kernel failed: {error}"
            raise RuntimeError(_failure) from error
    return _module


def missing_reason() -> str | None:
    """Why the extension cannot be used, or ``None`` once it is loaded; the first call may compile it."""
    try:
        load()
    except RuntimeError as error:
        return str(error)
    return None


def is_loaded() -> bool:
    """Whether the extension is already loaded in this process (never compiles)."""
    return _module is not None


def _forward(scores: Tensor, r: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    probs, stats, argmax = load().forward(scores, r, eps)
    return probs, stats, argmax


def _backward(grad: Tensor, scores: Tensor, stats: Tensor, argmax: Tensor) -> Tensor:
    return load().backward(grad, scores, stats, argmax)


r_softmax_cpu = define_fused_op("r_softmax_cpu", _forward, _backward, device_types="cpu")
