"""Swap the attention softmax of a transformers encoder for r-softmax.

r-softmax is registered with transformers as the attention implementation ``"rsoftmax"``, together with a mask
function of the same name, so that the padding mask reaches it as an additive float mask. :func:`patch_model` marks
the chosen self-attention modules with their sparsity rate and switches the model to that implementation; attention
modules that are not marked keep plain softmax.

Example:
    >>> model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
    >>> patch_model(model, r=0.2)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from rsoft_nlp.rsoftmax import r_softmax

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "rsoftmax"
CONFIG_KEY = "rsoftmax"
_RATE_ATTR = "rsoftmax_r"
_STATS_ATTR = "_rsoftmax_stats"

__all__ = ["ATTN_IMPLEMENTATION", "attention_modules", "load_model", "patch_model", "patched_layers", "unpatch_model"]


def rsoftmax_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention with r-softmax on marked modules and softmax on the others.

    Args:
        module: The attention module; its ``rsoftmax_r`` attribute (set by :func:`patch_model`) holds the rate.
        query: ``(batch, heads, q_len, head_dim)``.
        key: ``(batch, heads, k_len, head_dim)``.
        value: ``(batch, heads, k_len, head_dim)``.
        attention_mask: Additive float mask broadcasting to ``(batch, heads, q_len, k_len)``, or ``None``.
        scaling: Factor on the scores; ``head_dim ** -0.5`` when ``None``.
        dropout: Dropout on the probabilities, applied in training mode only.

    Returns:
        The attention output ``(batch, q_len, heads, head_dim)`` and the probabilities
        ``(batch, heads, q_len, k_len)``.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5

    # (batch, heads, q_len, k_len)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask

    r = getattr(module, _RATE_ATTR, None)
    if r is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    else:
        if isinstance(r, Tensor):
            r = r.to(scores.device)
        probs = r_softmax(scores, r, dim=-1)

    stats = getattr(module, _STATS_ATTR, None)
    if stats is not None:
        stats.update(probs.detach(), attention_mask)

    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    # (batch, heads, q_len, head_dim) -> (batch, q_len, heads, head_dim)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


AttentionInterface.register(ATTN_IMPLEMENTATION, rsoftmax_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


@functools.cache
def _dispatches_through_registry(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` that dispatch through transformers' attention registry, in layer order.

    Cross-attention modules (named ``crossattention``) are left out: encoders have none.
    """
    return [
        module
        for name, module in model.named_modules()
        if _dispatches_through_registry(type(module)) and "crossattention" not in name.split(".")
    ]


def _resolve_layers(layers: Sequence[int] | slice | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, slice):
        return list(range(num_layers))[layers]
    if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"`layers` must be None, a slice or a sequence of ints, got {layers!r}")
    resolved = []
    for index in layers:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"`layers` must hold indices in [{-num_layers}, {num_layers - 1}], got {index}")
        resolved.append(index % num_layers)
    return sorted(set(resolved))


def _check_rate(r: float, name: str) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {r!r}")
    return float(r)


def _resolve_rates(r: float | Sequence[float] | Tensor, layers: list[int], num_heads: int | None) -> list:
    """One rate per patched layer: a float, or a ``(1, heads, 1, 1)`` tensor for per-head rates."""
    if isinstance(r, Tensor):
        if r.ndim == 1 and num_heads is not None and r.numel() != num_heads:
            raise ValueError(f"`r` per head must have {num_heads} values, got shape {tuple(r.shape)}")
        if r.ndim == 2 and r.shape != (len(layers), num_heads):
            raise ValueError(
                f"`r` per layer and head must have shape ({len(layers)}, {num_heads}), got {tuple(r.shape)}"
            )
        if r.ndim not in (0, 1, 2):
            raise ValueError(f"`r` as a tensor must be 0-D, (heads,) or (layers, heads), got shape {tuple(r.shape)}")
        if bool((torch.isnan(r) | (r < 0) | (r > 1)).any()):
            raise ValueError(f"`r` must hold numbers in [0, 1], got {r.tolist()}")
        r = r.detach().float().cpu()
        if r.ndim == 0:
            return [float(r)] * len(layers)
        rows = r.expand(len(layers), -1) if r.ndim == 1 else r
        # (heads,) -> (1, heads, 1, 1) to broadcast over (batch, heads, q_len, k_len)
        return [row.view(1, -1, 1, 1).clone() for row in rows]
    if isinstance(r, Sequence) and not isinstance(r, str):
        if len(r) != len(layers):
            raise ValueError(f"`r` as a list must have one rate per patched layer ({len(layers)}), got {len(r)}")
        return [_check_rate(v, "r") for v in r]
    return [_check_rate(r, "r")] * len(layers)


def _num_heads(model: nn.Module) -> int | None:
    return getattr(model.config, "num_attention_heads", None)


def patch_model(
    model: PreTrainedModel,
    r: float | Sequence[float] | Tensor = 0.2,
    layers: Sequence[int] | slice | None = None,
) -> PreTrainedModel:
    """Runs r-softmax instead of softmax in the self-attention of ``model``, in place.

    Patching again replaces earlier settings. The settings are stored in ``model.config.rsoftmax``, so
    ``save_pretrained`` writes them to ``config.json`` and :func:`load_model` restores them.

    Args:
        model: A transformers model whose attention dispatches through the attention-function registry.
        r: The sparsity rate: one float for every patched layer, a list with one float per patched layer, or a
            tensor of shape ``(heads,)`` (the same rates in each layer) or ``(layers, heads)``.
        layers: Which layers to patch: ``None`` for all, a list of indices (negative ones count from the end) or a
            slice such as ``slice(-2, None)`` for the last two.

    Returns:
        The same model, for chaining.

    Raises:
        NotImplementedError: If the model computes its attention softmax in its own code.
        ValueError: If ``r`` or ``layers`` are out of range.
    """
    modules = attention_modules(model)
    if not modules:
        raise NotImplementedError(
            f"{type(model).__name__} computes its attention softmax in its own code, so r-softmax cannot be swapped "
            "in; supported are models whose attention dispatches through transformers' attention-function registry "
            "(BERT, RoBERTa, XLM-RoBERTa, ELECTRA, MiniLM and other BERT-style encoders)"
        )

    chosen = _resolve_layers(layers, len(modules))
    rates = _resolve_rates(r, chosen, _num_heads(model))
    _clear_marks(modules)
    for index, rate in zip(chosen, rates, strict=True):
        setattr(modules[index], _RATE_ATTR, rate)

    settings = getattr(model.config, CONFIG_KEY, None) or {}
    original = settings.get("original_attn_implementation") or model.config._attn_implementation or "eager"
    if original == ATTN_IMPLEMENTATION:
        original = "eager"
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.config.rsoftmax = {
        "r": [rate.flatten().tolist() if isinstance(rate, Tensor) else rate for rate in rates],
        "layers": chosen,
        "num_layers": len(modules),
        "original_attn_implementation": original,
    }
    logger.info("r-softmax in %d of %d attention layers: %s", len(chosen), len(modules), chosen)
    return model


def _clear_marks(modules: list[nn.Module]) -> None:
    for module in modules:
        if hasattr(module, _RATE_ATTR):
            delattr(module, _RATE_ATTR)


def unpatch_model(model: PreTrainedModel) -> PreTrainedModel:
    """Restores plain softmax and the attention implementation the model had before :func:`patch_model`."""
    _clear_marks(attention_modules(model))
    settings = getattr(model.config, CONFIG_KEY, None)
    if settings:
        model.set_attn_implementation(settings.get("original_attn_implementation") or "eager")
        del model.config.rsoftmax
    return model


def patched_layers(model: nn.Module) -> dict[int, float | list[float]]:
    """Maps each patched layer's index to its rate (a list of per-head rates for a tensor rate)."""
    result = {}
    for index, module in enumerate(attention_modules(model)):
        rate = getattr(module, _RATE_ATTR, None)
        if rate is not None:
            result[index] = rate.flatten().tolist() if isinstance(rate, Tensor) else rate
    return result


def load_model(path: str, model_class=None, **kwargs) -> PreTrainedModel:
    """Loads a checkpoint saved from a patched model and restores its r-softmax settings.

    Args:
        path: A local folder or Hub id, as for ``from_pretrained``.
        model_class: The auto class to load with; ``AutoModelForSequenceClassification`` by default.
        **kwargs: Passed to ``from_pretrained``.

    Returns:
        The model, patched as it was when saved (unpatched if the checkpoint carries no r-softmax settings).
    """
    if model_class is None:
        from transformers import AutoModelForSequenceClassification as model_class
    model = model_class.from_pretrained(path, **kwargs)
    settings = getattr(model.config, CONFIG_KEY, None)
    if settings:
        rates = settings["r"]
        if any(isinstance(rate, list) for rate in rates):
            rates = torch.tensor([rate if isinstance(rate, list) else [rate] for rate in rates])
        patch_model(model, r=rates, layers=settings["layers"])
    return model


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


class _LayerCounter:
    def __init__(self, stats: SparsityStats, index: int):
        self.stats = stats
        self.index = index

    def update(self, probs: Tensor, attention_mask: Tensor | None) -> None:
        # probs: (batch, heads, q_len, k_len); the mask marks padded keys with a large negative value.
        unmasked = torch.ones_like(probs, dtype=torch.bool)
        if attention_mask is not None:
            key_ok = attention_mask[..., : probs.shape[-1]] > torch.finfo(attention_mask.dtype).min / 2
            unmasked = unmasked & key_ok
            if probs.shape[-1] == probs.shape[-2]:
                # Padded positions are padded queries as well: their rows are left out.
                # (batch, 1, 1, k_len) -> (batch, 1, q_len, 1)
                unmasked = unmasked & key_ok[..., :1, :].transpose(-1, -2)
        zeros = ((probs == 0) & unmasked).sum(dim=(0, 2, 3)).cpu()
        keys = unmasked.expand_as(probs).sum(dim=(0, 2, 3)).cpu()
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
        if getattr(module, _RATE_ATTR, None) is not None:
            setattr(module, _STATS_ATTR, _LayerCounter(stats, index))
    try:
        yield stats
    finally:
        for module in modules:
            if hasattr(module, _STATS_ATTR):
                delattr(module, _STATS_ATTR)
