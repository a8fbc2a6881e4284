"""Draw softmax and r-softmax attention maps of one sentence side by side, and the sparsity each layer achieves.

Example:
    python scripts/plot_attention.py --model path/to/checkpoint --text "The cat sat on the mat." \
        --r 0.5 --layers 0 5 --heads 0 3 --output attention.png
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from rsoft_nlp.patching import attention_stats, patch_model, unpatch_model  # noqa: E402

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local checkpoint folder (or Hub id) with its tokenizer")
    parser.add_argument("--text", default="The quick brown fox jumps over the lazy dog.", help="the sentence")
    parser.add_argument("--r", type=float, default=0.5, help="the sparsity rate of r-softmax, in [0, 1]")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[0, -1], help="layers to draw (negative from the end)"
    )
    parser.add_argument("--heads", type=int, nargs="+", default=[0, 1], help="heads to draw in each chosen layer")
    parser.add_argument("--output", type=Path, default=Path("attention.png"), help="the PNG to write")
    return parser.parse_args(argv)


def _attentions(model, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(**batch, output_attentions=True).attentions


def _draw_map(ax, probs: torch.Tensor, tokens: list[str], title: str) -> None:
    # Exact zeros are drawn white, so r-softmax's sparsity stands apart from small probabilities.
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    values = np.ma.masked_where(probs.numpy() == 0, probs.numpy())
    ax.imshow(values, cmap=cmap, vmin=0.0, vmax=float(probs.max()))
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=9)


def _draw_sparsity(ax, stats: dict, r: float) -> None:
    layers = sorted(stats["layers"])
    achieved = [stats["layers"][i]["achieved"] for i in layers]
    ax.bar(layers, achieved, color="tab:orange", label="achieved exact zeros")
    ax.axhline(r, color="black", linestyle="--", label=f"requested r = {r}")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of unmasked keys at 0")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("achieved sparsity per layer", fontsize=9)


def main(argv: list[str] | None = None) -> Path:
    """Writes the figure and returns its path."""
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, attn_implementation="eager").eval()
    unpatch_model(model)  # a checkpoint saved patched comes back patched: start from softmax
    batch = tokenizer(args.text, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])

    softmax = _attentions(model, batch)
    patch_model(model, r=args.r)
    sparse = _attentions(model, batch)
    stats = attention_stats(model, batch)

    num_layers = len(softmax)
    layers = [index % num_layers for index in args.layers]
    pairs = [(layer, head) for layer in layers for head in args.heads]
    size = 0.35 * len(tokens) + 2
    fig = plt.figure(figsize=(2 * size, size * len(pairs) + 3.5))
    grid = fig.add_gridspec(len(pairs) + 1, 2, height_ratios=[size] * len(pairs) + [3.5])
    for row, (layer, head) in enumerate(pairs):
        title = f"layer {layer}, head {head}"
        _draw_map(fig.add_subplot(grid[row, 0]), softmax[layer][0, head], tokens, f"softmax, {title}")
        _draw_map(fig.add_subplot(grid[row, 1]), sparse[layer][0, head], tokens, f"r-softmax (r = {args.r}), {title}")
    _draw_sparsity(fig.add_subplot(grid[-1, :]), stats, args.r)

    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", args.output)
    return args.output


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
