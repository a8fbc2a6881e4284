"""Benchmark r-softmax backends against softmax, sparsemax, entmax15 and the paper's sort/quantile rule.

Times forward and forward+backward on attention-shaped scores ``(batch, heads, q_len, k_len)`` where half of the batch
is padded (20-40% of the keys, additive ``finfo.min`` mask), in float32 and bf16, with one thread and with all of
them. Candidates are interleaved call by call within one process after warming up until the heap settles (at least
3 rounds of calls, then until a round faults in almost no fresh pages, at most 10); the table reports medians, page
faults and the ratio to ``torch.softmax``. Peak extra memory of one forward call is the growth of the resident set
(Linux ``VmHWM`` after a reset, minus ``VmRSS``) in a child process where every large allocation is mmap-backed; it
includes the output and the fused kernel's per-thread scratch.

Timed runs keep freed memory in the process by default (``--heap keep``, see ``bench_common.py``), so that once the
heap has settled no candidate is timed faulting in freshly mapped pages; ``--heap system`` times with the C library's
defaults.

Usage::

    python scripts/bench_rsoftmax.py [--quick] [--repeats N] [--heap keep|system] [--out runs/bench]

entmax and matplotlib come with the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bench_common
import torch

from rsoft_nlp import r_softmax
from rsoft_nlp.checkpointing import write_bytes_atomic, write_text_atomic
from rsoft_nlp.kernels import cpu

try:
    import resource  # Unix only: page-fault counts
except ImportError:
    resource = None

logger = logging.getLogger("bench_rsoftmax")

FULL_SHAPES = [(4, 12, 64, 64), (8, 12, 128, 128), (32, 12, 128, 128), (8, 12, 512, 512)]
QUICK_SHAPES = [(4, 12, 64, 64), (8, 12, 128, 128)]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
# Warm-up rounds stop once a whole round, from round MIN_WARMUP_ROUNDS on, faults in fewer fresh pages than
# SETTLED_FAULTS, or after WARMUP_ROUNDS.
MIN_WARMUP_ROUNDS = 3
WARMUP_ROUNDS = 10
SETTLED_FAULTS = 256
# torch.quantile refuses inputs with more than 2**24 elements.
QUANTILE_LIMIT = 2**24


def padded_scores(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random scores with half of the batch padded by an additive finfo.min mask over 20-40% of the keys."""
    gen = torch.Generator().manual_seed(seed)
    batch, _, _, k_len = shape
    scores = torch.randn(shape, generator=gen) * 2  # (batch, heads, q_len, k_len)
    mask = torch.zeros(batch, 1, 1, k_len)  # (batch, 1, 1, k_len)
    for b in range(batch // 2):
        pad = int(k_len * (0.2 + 0.2 * torch.rand((), generator=gen).item()))
        mask[b, ..., k_len - pad :] = torch.finfo(torch.float32).min
    return (scores + mask).to(dtype)


def paper_rule(scores: torch.Tensor, r: float) -> torch.Tensor:
    """The paper's rule row-wise: quantile over every key of the row, masked ones included, then reweighting."""
    # NOTE: as in the paper's reference code, padded keys count toward the quantile here; rsoft_nlp counts unmasked
    # keys only.
    x = scores.float()
    z = x - x.max(dim=-1, keepdim=True).values
    t = (-torch.quantile(z, r, dim=-1, keepdim=True) + 1e-8).detach()
    weighted = torch.relu(z + t) * torch.exp(z)
    return (weighted / weighted.sum(dim=-1, keepdim=True)).to(scores.dtype)


def candidates(r: float, shape: tuple[int, ...]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Name -> function of the scores, for one rate; entries missing here are skipped with a log line."""
    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "softmax": lambda x: torch.softmax(x, dim=-1),
        "rsoftmax[torch]": lambda x: r_softmax(x, r, backend="torch"),
    }
    if cpu.missing_reason() is None:
        found["rsoftmax[cpu]"] = lambda x: r_softmax(x, r, backend="cpu")
    try:
        import entmax
    except ImportError:
        logger.warning("entmax is not installed (pip install -e '.[bench]'): skipping sparsemax and entmax15")
    else:
        found["sparsemax"] = lambda x: entmax.sparsemax(x, dim=-1)
        found["entmax15"] = lambda x: entmax.entmax15(x, dim=-1)
    if torch.Size(shape).numel() <= QUANTILE_LIMIT:
        found["paper rule"] = lambda x: paper_rule(x, r)
    return found


def minor_faults() -> int:
    """Page faults this process has served without disk I/O so far (0 where ``resource`` is missing)."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_once(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor | None
) -> tuple[float, float, int]:
    """Wall-clock seconds, process CPU seconds and page faults of one forward (and backward when ``grad`` is given)."""
    faults = minor_faults()
    start, start_cpu = time.perf_counter(), time.process_time()
    if grad is None:
        with torch.no_grad():
            fn(x)
    else:
        x.grad = None
        fn(x).backward(grad)
    return time.perf_counter() - start, time.process_time() - start_cpu, minor_faults() - faults


def time_interleaved(
    fns: dict[str, Callable], x: torch.Tensor, backward: bool, repeats: int, budget_s: float
) -> dict[str, tuple[float, float, float]]:
    """Median (wall s, CPU s, page faults) per candidate: one call each per round after warming up, fewer for slow
    ones."""
    leaf = x.detach().clone().requires_grad_(backward)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype) if backward else None
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in fns}
    # Warm up until the heap has settled (a round, after the first MIN_WARMUP_ROUNDS - 1, that faults in almost no
    # fresh pages), at most WARMUP_ROUNDS rounds; candidates slower than a second per call warm up once.
    slow: set[str] = set()
    for round_index in range(WARMUP_ROUNDS):
        fresh = 0
        for name, fn in fns.items():
            if round_index > 0 and name in slow:
                continue
            wall, _, faults = run_once(fn, leaf, grad)
            fresh += faults
            if wall > 1.0:
                slow.add(name)
        if round_index + 1 >= MIN_WARMUP_ROUNDS and fresh < SETTLED_FAULTS:
            break
    for round_index in range(repeats):
        for name, fn in fns.items():
            # Slow candidates stop after two timed calls once they have used their budget.
            if round_index >= 2 and sum(wall for wall, _, _ in times[name]) > budget_s:
                continue
            times[name].append(run_once(fn, leaf, grad))
    return {
        name: tuple(statistics.median(column) for column in zip(*values, strict=True))
        for name, values in times.items()
    }


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"`{key}` must be in /proc/self/status")


def peak_extra_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Peak resident-memory growth during one forward call (Linux: VmHWM after resetting it, minus VmRSS)."""
    with torch.no_grad():
        fn(x)  # warm-up: libraries, the extension, thread pools
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
        out = fn(x)
        peak = _status_kib("VmHWM")
        del out
    return (peak - before) * 1024


def memory_table(shapes: list[tuple[int, ...]]) -> list[tuple[str, str, float, float]]:
    """Runs the memory measurements in a child process whose large allocations are all mmap-backed.

    With a fixed ``MALLOC_MMAP_THRESHOLD_`` glibc maps every large block and unmaps it on free, so the resident set
    follows the live tensors instead of a heap that keeps freed pages.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    spec = json.dumps([list(shape) for shape in shapes])
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", spec], env=env, capture_output=True, text=True, check=True
    )
    return [tuple(row) for row in json.loads(done.stdout.strip().splitlines()[-1])]


def memory_child(spec: str) -> None:
    rows = []
    for shape in [tuple(s) for s in json.loads(spec)]:
        x = padded_scores(shape, torch.float32)
        input_bytes = x.numel() * x.element_size()
        for name, fn in candidates(0.5, shape).items():
            extra = peak_extra_bytes(fn, x)
            rows.append((name, "x".join(map(str, shape)), extra / 2**20, extra / input_bytes))
    sys.stdout.write(json.dumps(rows) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return
    chosen = [
        row for row in rows if row["dtype"] == "float32" and row["mode"] == "fwd+bwd" and row["r"] in ("", "0.5")
    ]
    shapes = sorted({row["shape"] for row in chosen}, key=lambda s: [int(v) for v in s.split("x")])
    names = sorted({row["candidate"] for row in chosen if row["candidate"] != "softmax"})
    threads = sorted({row["threads"] for row in chosen})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4), squeeze=False)
    width = 0.8 / max(len(names), 1)
    for ax, thread_count in zip(axes[0], threads, strict=True):
        for i, name in enumerate(names):
            ratios = []
            for shape in shapes:
                match = [
                    row["cpu_ratio"] if thread_count == 1 else row["ratio"]
                    for row in chosen
                    if row["candidate"] == name and row["shape"] == shape and row["threads"] == thread_count
                ]
                ratios.append(match[0] if match else float("nan"))
            ax.bar([s + i * width for s in range(len(shapes))], ratios, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))], shapes, rotation=15)
        ax.set_ylabel("time / softmax time (" + ("CPU time" if thread_count == 1 else "wall clock") + ")")
        ax.set_title(f"float32 forward+backward, r=0.5, {thread_count} thread(s)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, image.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    parser.add_argument("--quick", action="store_true", help="two small shapes, r=0.5 only, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration")
    parser.add_argument(
        "--heap",
        choices=bench_common.HEAP_CHOICES,
        default="keep",
        help="keep: reuse freed memory, so settled calls fault in no fresh pages (default); system: C defaults",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    bench_common.check_output_folder(parser, args.out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    heap_note = bench_common.apply_heap(args.heap)
    logger.info(heap_note)

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rates = [0.5] if args.quick else [0.2, 0.5]
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 4)
    budget_s = 2.0 if args.quick else 3.0
    all_threads = torch.get_num_threads()
    thread_counts = sorted({1, all_threads})
    if cpu.missing_reason() is not None:
        logger.warning("fused CPU kernel unavailable: %s", cpu.missing_reason())

    rows: list[dict] = []
    for shape in shapes:
        for dtype_name, dtype in DTYPES.items():
            x = padded_scores(shape, dtype)
            for thread_count in thread_counts:
                torch.set_num_threads(thread_count)
                for mode in ("fwd", "fwd+bwd"):
                    # softmax and entmax do not depend on r: time them with the first rate only.
                    for rate_index, rate in enumerate(rates):
                        fns = candidates(rate, shape)
                        if rate_index > 0:
                            fns = {k: v for k, v in fns.items() if k.startswith(("rsoftmax", "paper"))}
                            fns["softmax"] = lambda s: torch.softmax(s, dim=-1)
                        medians = time_interleaved(fns, x, mode == "fwd+bwd", repeats, budget_s)
                        base, base_cpu, _ = medians["softmax"]
                        for name, (seconds, cpu_seconds, faults) in medians.items():
                            if name == "softmax" and rate_index > 0:
                                continue
                            depends = name.startswith(("rsoftmax", "paper"))
                            rows.append(
                                {
                                    "shape": "x".join(map(str, shape)),
                                    "dtype": dtype_name,
                                    "threads": thread_count,
                                    "mode": mode,
                                    "candidate": name,
                                    "r": str(rate) if depends else "",
                                    "ms": seconds * 1e3,
                                    "ratio": seconds / base,
                                    "cpu_ms": cpu_seconds * 1e3,
                                    "cpu_ratio": cpu_seconds / base_cpu,
                                    "faults": faults,
                                }
                            )
                        logger.info(
                            "%s %s threads=%d %s r=%s: %s",
                            shape,
                            dtype_name,
                            thread_count,
                            mode,
                            rate,
                            ", ".join(
                                f"{k} {v[0] * 1e3:.1f} ms (CPU {v[1] * 1e3:.1f}, {v[2]:.0f} faults)"
                                for k, v in medians.items()
                            ),
                        )
    torch.set_num_threads(all_threads)

    memory_rows = memory_table(shapes)

    lines = [
        "# r-softmax benchmark",
        "",
        f"torch {torch.__version__}, {all_threads} threads available, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {'quick' if args.quick else 'full'} run, "
        f"median of up to {repeats} interleaved calls after warming up until the heap settles ({MIN_WARMUP_ROUNDS} to "
        f"{WARMUP_ROUNDS} rounds; slow candidates: one warm-up, at least 2 timed calls).",
        "Scores: randn * 2, half of the batch padded over 20-40% of the keys with an additive finfo.min mask.",
        heap_note,
        "",
        "Wall: median wall-clock time. CPU: median process CPU time (all threads together); on a shared machine the "
        "one-thread CPU-time ratio is the steadier figure, wall time is what a user waits. With several threads the "
        "CPU time also counts worker threads spinning while they wait for work, so compare wall time there.",
        "",
        "Faults: median page faults per call (a fresh 4 KiB page each); a 25 MB output that lands on fresh pages "
        "costs about 6,000.",
        "",
        "| shape | dtype | threads | mode | candidate | r | wall ms | x softmax (wall) | CPU ms | x softmax (CPU) "
        "| faults |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} | {row['dtype']} | {row['threads']} | {row['mode']} | {row['candidate']} | {row['r']} "
            f"| {row['ms']:.2f} | {row['ratio']:.2f} | {row['cpu_ms']:.2f} | {row['cpu_ratio']:.2f} "
            f"| {row['faults']:.0f} |"
        )
    lines += [
        "",
        "## Peak extra memory of one forward call (float32, r=0.5, all threads)",
        "",
        "Peak resident-set growth (Linux VmHWM reset through /proc/self/clear_refs, minus VmRSS before the call) "
        "in a child process where glibc maps every block over 128 KiB, so freed tensors leave the resident set. "
        "The output tensor counts; a warm-up call comes first. Page-granular and approximate (about +-0.3 MiB).",
        "",
        "| candidate | shape | peak extra MiB | x input size |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {shape} | {mib:.1f} | {ratio:.2f} |" for name, shape, mib, ratio in memory_rows]
    write_text_atomic(args.out / "bench_rsoftmax.md", "\n".join(lines) + "\n")
    write_plot(rows, args.out / "bench_rsoftmax.png")
    logger.info("wrote %s and %s", args.out / "bench_rsoftmax.md", args.out / "bench_rsoftmax.png")


if __name__ == "__main__":
    main()
