"""The fused CPU kernel: a C++ extension compiled on first use and exposed as the op ``rsoft_nlp::r_softmax_cpu``.

The extension is built with ``torch.utils.cpp_extension.load`` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default under ``~/.cache/torch_extensions``); the first build takes about a minute, later imports reuse it.

It is built for the widest instruction set that both this CPU and torch's own kernels use: ``"avx512"`` (16 float32
lanes), ``"avx2"`` (8 lanes) or ``"base"`` (portable C++, whatever the compiler makes of it). The environment
variable ``RSOFT_CPU_ISA`` picks a narrower one, e.g. to compare them; a wider one than the CPU has is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
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
_HEADER = Path(__file__).with_name("rsoftmax_simd.h")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
# Widest first, with the float32 lanes of each build. Each -m<feature> flag names a /proc/cpuinfo flag the CPU must
# have. F16C converts half rows; every AVX2 CPU has it, but it is checked like the rest.
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "base": [],
}
_ISA_LANES = {"avx512": 16, "avx2": 8, "base": 1}
ISA_ENV_VAR = "RSOFT_CPU_ISA"
_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or ``None`` where that file cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def supported_isas() -> list[str]:
    """Instruction sets the kernel can be built for here, widest first; ``"base"`` is always last."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["base"]
    # NOTE: torch's capability also honours ATEN_CPU_CAPABILITY, so lowering torch's kernels lowers this one too.
    capability = torch.backends.cpu.get_cpu_capability()
    torch_isas = {"AVX512": ["avx512", "avx2"], "AVX2": ["avx2"]}.get(capability, [])
    flags = _cpu_flags()
    needs = {isa: {flag.removeprefix("-m") for flag in _ISA_FLAGS[isa]} for isa in torch_isas}
    return [isa for isa in torch_isas if flags is None or needs[isa] <= flags] + ["base"]


def _isa() -> str:
    """The instruction set to build for: ``RSOFT_CPU_ISA`` when set, else the widest supported one.

    Raises:
        RuntimeError: If ``RSOFT_CPU_ISA`` names an unknown instruction set or one this CPU cannot run.
    """
    supported = supported_isas()
    wanted = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if not wanted or wanted == "auto":
        return supported[0]
    if wanted not in _ISA_FLAGS:
        raise RuntimeError(f"{ISA_ENV_VAR} must be one of auto, {', '.join(_ISA_FLAGS)}, got {wanted!r}")
    if wanted not in supported:
        raise RuntimeError(
            f"{ISA_ENV_VAR}={wanted} cannot run here: this CPU and torch support {', '.join(supported)}"
        )
    return wanted


def _build_flags(isa: str) -> list[str]:
    # NOTE: no -march=native, so a shared extension cache never holds code for another CPU: the build is named after
    # the ISA it targets. -ffp-contract=off keeps a * b + c rounded as two ops in the portable rows, as the reference
    # path computes it; -fno-trapping-math only lets the compiler turn their selects into vector blends.
    # The header's hash is passed as a define because torch's extension cache versions a build by its sources and
    # flags, not by the headers they include.
    header_hash = hashlib.sha256(_HEADER.read_bytes()).hexdigest()[:16]
    return _FLAGS + _ISA_FLAGS[isa] + [f"-DRSOFT_SIMD_HEADER_{header_hash}"]


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

        try:
            isa = _isa()
        except RuntimeError as error:
            _failure = str(error)
            raise
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
        logger.info("Fused r-softmax CPU kernel: %s build, %d float32 lanes", isa, _module.simd_width())
    return _module


def missing_reason() -> str | None:
    """Why the extension cannot be used, or ``None`` once it is loaded; the first call may compile it."""
    try:
        load()
    except RuntimeError as error:
        return str(error)
    return None


def describe() -> str:
    """The loaded build, e.g. ``"avx512 build, 16 float32 lanes"``; loads it first (the first call may compile)."""
    lanes = load().simd_width()
    isa = next(name for name, count in _ISA_LANES.items() if count == lanes)
    return f"{isa} build, {lanes} float32 lanes"


def is_loaded() -> bool:
    """Whether the extension is already loaded in this process (never compiles)."""
    return _module is not None


def _forward(scores: Tensor, r: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    probs, stats, argmax = load().forward(scores, r, eps)
    return probs, stats, argmax


def _backward(grad: Tensor, scores: Tensor, stats: Tensor, argmax: Tensor) -> Tensor:
    return load().backward(grad, scores, stats, argmax)


r_softmax_cpu = define_fused_op("r_softmax_cpu", _forward, _backward, device_types="cpu")
