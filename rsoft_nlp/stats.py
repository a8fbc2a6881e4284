"""Achieved attention sparsity: the exact zeros that r-softmax puts among the keys a query may see."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rsoft_nlp.attention import RATE_ATTR, STATS_ATTR, attention_modules

__all__ = ["SparsityStats", "attention_stats", "record_sparsity"]


@dataclass
class SparsityStats:
    """Exact zeros among unmasked keys, per layer and head, accumulated over forward passes."""

    zeros: dict[int, Tensor] = field(default_factory=dict)
    keys: dict[int, Tensor] = field(default_factory=dict)

    def per_layer(self) -> dict[int, float]:
        return {i: float(self.zeros[i].sum() / self.keys[i].sum().clamp_min(1)) for i in sorted(self.zeros)}

    def per_head(self) -> dict[int, list[float]]:
        return {i: (self.zeros[i] / self.keys[i].clamp_min(1)).tolist() for i in sorted(self.zeros)}

    def overall(self) -> float | None:
        if not self.zeros:
            return None
        return float(sum(z.sum() for z in self.zeros.values()) / sum(k.sum() for k in self.keys.values()).clamp_min(1))


def unmasked_keys(scores: Tensor) -> Tensor:
    """Which entries of masked ``scores`` ``(batch, heads, q_len, k_len)`` are keys the query may see.

    A key is masked when its score is ``-inf`` or at most half the dtype's minimum (transformers adds or fills in
    the minimum). Rows of padded queries are left out too: when ``q_len == k_len``, position ``i`` is padding when
    key ``i`` is masked for every query.
    """
    unmasked = scores > torch.finfo(scores.dtype).min / 2
    if scores.shape[-1] == scores.shape[-2]:
        # (batch, heads, q_len, k_len) -> (batch, heads, 1, k_len) -> (batch, heads, q_len, 1)
        real = unmasked.any(dim=-2, keepdim=True).transpose(-1, -2)
        unmasked = unmasked & real
    return unmasked


class _LayerCounter:
    def __init__(self, stats: SparsityStats, index: int):
        self.stats = stats
        self.index = index

    def update(self, probs: Tensor, scores: Tensor) -> None:
        unmasked = unmasked_keys(scores)
        zeros = ((probs == 0) & unmasked).sum(dim=(0, 2, 3)).cpu()
        keys = unmasked.sum(dim=(0, 2, 3)).cpu()
        if self.index in self.stats.zeros:
            self.stats.zeros[self.index] += zeros
            self.stats.keys[self.index] += keys
        else:
            self.stats.zeros[self.index] = zeros
            self.stats.keys[self.index] = keys


@contextlib.contextmanager
def record_sparsity(model: nn.Module) -> Iterator[SparsityStats]:
    """Counts, while active, the exact zeros that patched layers put among unmasked keys.

    Example:
        >>> with record_sparsity(model) as stats:
        ...     model(**batch)
        >>> stats.per_layer()
    """
    stats = SparsityStats()
    modules = attention_modules(model)
    for index, module in enumerate(modules):
        if getattr(module, RATE_ATTR, None) is not None:
            setattr(module, STATS_ATTR, _LayerCounter(stats, index))
    try:
        yield stats
    finally:
        for module in modules:
            if hasattr(module, STATS_ATTR):
                delattr(module, STATS_ATTR)


def attention_stats(model: nn.Module, batch: Mapping[str, Tensor]) -> dict:
    """Runs ``model`` on ``batch`` without gradients and reports the achieved sparsity beside the requested rates.

    Args:
        model: A patched model.
        batch: Keyword inputs for the model, e.g. a tokenizer's output (``input_ids``, ``attention_mask``).

    Returns:
        ``{"overall": float, "layers": {index: {"r": rate, "achieved": float, "heads": [float, ...]}}}``, where
        ``r`` is the requested rate (a float, or a list of per-head rates) and the achieved values are the fractions
        of exact zeros among the keys each query may see.
    """
    from rsoft_nlp.patching import patched_layers

    requested = patched_layers(model)
    with torch.no_grad(), record_sparsity(model) as stats:
        model(**batch)
    per_head = stats.per_head()
    layers = {
        index: {"r": requested[index], "achieved": achieved, "heads": per_head[index]}
        for index, achieved in stats.per_layer().items()
    }
    return {"overall": stats.overall(), "layers": layers}
