"""Swap the attention softmax of a transformers encoder for r-softmax.

:func:`patch_model` marks the chosen self-attention modules with their sparsity rate; encoders that dispatch
through transformers' attention registry are switched to the ``"rsoftmax"`` implementation, and the few that compute
their softmax in their own code get an adapter forward (see :mod:`rsoft_nlp.attention`). Attention modules that are
not marked keep plain softmax. The settings live in ``model.config.rsoftmax``, so ``config.json`` carries them; once
this package is imported, ``from_pretrained`` of any transformers model restores them.

Example:
    >>> model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
    >>> patch_model(model, r=linear_schedule(0.1, 0.5, 12))
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from rsoft_nlp.attention import (
    ATTN_IMPLEMENTATION,
    RATE_ATTR,
    attention_modules,
    bind_adapter,
    dispatches_through_registry,
    needs_adapter,
    unbind_adapter,
    unsupported_reason,
)
from rsoft_nlp.stats import SparsityStats, attention_stats, record_sparsity

logger = logging.getLogger(__name__)

CONFIG_KEY = "rsoftmax"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SparsityStats",
    "attention_modules",
    "attention_stats",
    "linear_schedule",
    "load_model",
    "patch_model",
    "patched_layers",
    "record_sparsity",
    "unpatch_model",
]


def _resolve_layers(layers: Sequence[int] | slice | None, num_layers: int) -> list[int]:
    """Layer indices in the order given (so that per-layer rates pair with them), each in [0, num_layers)."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, slice):
        resolved = list(range(num_layers))[layers]
    elif isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"`layers` must be None, a slice or a sequence of ints, got {layers!r}")
    else:
        resolved = []
        for index in layers:
            if not -num_layers <= index < num_layers:
                raise ValueError(f"`layers` must hold indices in [{-num_layers}, {num_layers - 1}], got {index}")
            resolved.append(index % num_layers)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"`layers` must not name a layer twice, got {list(layers)}")
    if not resolved:
        raise ValueError(f"`layers` must select at least one of the {num_layers} layers, got {layers!r}")
    return resolved


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


def _num_heads(model: nn.Module, modules: list[nn.Module]) -> int | None:
    for name in ("num_attention_heads", "num_heads", "n_heads"):
        value = getattr(modules[0], name, None)
        if isinstance(value, int):
            return value
    return getattr(model.config, "num_attention_heads", None)


def linear_schedule(r_first: float, r_last: float, num_layers: int) -> list[float]:
    """Rates that go linearly from ``r_first`` in the first layer to ``r_last`` in the last, for ``patch_model``.

    Example:
        >>> linear_schedule(0.0, 0.6, 4)
        [0.0, 0.2, 0.4, 0.6]
    """
    r_first, r_last = _check_rate(r_first, "r_first"), _check_rate(r_last, "r_last")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"`num_layers` must be a positive int, got {num_layers!r}")
    if num_layers == 1:
        return [r_first]
    step = (r_last - r_first) / (num_layers - 1)
    return [round(r_first + i * step, 12) for i in range(num_layers)]


def _check_supported(model: nn.Module, modules: list[nn.Module]) -> None:
    reason = unsupported_reason(model)
    if reason is None and modules:
        return
    raise NotImplementedError(
        f"{reason or type(model).__name__ + ' computes its attention softmax in its own code'}, so r-softmax cannot "
        "be swapped in; supported are encoders whose attention dispatches through transformers' attention-function "
        "registry (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ALBERT, ELECTRA, ModernBERT and more) and DeBERTa, "
        "DeBERTa-v2/v3, MPNet, MegatronBERT and RemBERT (see the README's table)"
    )


def patch_model(
    model: PreTrainedModel,
    r: float | Sequence[float] | Tensor = 0.2,
    layers: Sequence[int] | slice | None = None,
) -> PreTrainedModel:
    """Runs r-softmax instead of softmax in the self-attention of ``model``, in place.

    Patching again replaces earlier settings (the same settings twice give the same model). The settings are stored
    in ``model.config.rsoftmax``, so ``save_pretrained`` writes them to ``config.json``.

    Args:
        model: A transformers encoder (or a PEFT model wrapping one).
        r: The sparsity rate: one float for every patched layer, a list with one float per patched layer (see
            :func:`linear_schedule`), or a tensor of shape ``(heads,)`` (the same rates in each layer) or
            ``(layers, heads)``.
        layers: Which layers to patch: ``None`` for all, a list of indices (negative ones count from the end) or a
            slice such as ``slice(-2, None)`` for the last two.

    Returns:
        The same model, for chaining.

    Raises:
        NotImplementedError: If the model computes its attention in a way r-softmax cannot enter.
        ValueError: If ``r`` or ``layers`` are out of range.
    """
    modules = attention_modules(model)
    _check_supported(model, modules)
    chosen = _resolve_layers(layers, len(modules))
    rates = _resolve_rates(r, chosen, _num_heads(model, modules))

    _clear_marks(modules)
    for index, rate in zip(chosen, rates, strict=True):
        setattr(modules[index], RATE_ATTR, rate)
        if needs_adapter(modules[index]):
            bind_adapter(modules[index])

    settings = getattr(model.config, CONFIG_KEY, None) or {}
    original = settings.get("original_attn_implementation") or model.config._attn_implementation or "eager"
    if original == ATTN_IMPLEMENTATION:
        original = "eager"
    if any(dispatches_through_registry(type(module)) for module in modules):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.config.rsoftmax = {
        "r": [rate.flatten().tolist() if isinstance(rate, Tensor) else rate for rate in rates],
        "layers": chosen,
        "num_layers": len(modules),
        "original_attn_implementation": original,
    }
    # NOTE: written to config.json as `attn_implementation`, so that loading the checkpoint with transformers alone
    # fails with "rsoftmax is not supported" instead of silently running softmax; with this package imported,
    # `from_pretrained` accepts it and the hook below restores the layers' rates.
    model.config.attn_implementation = ATTN_IMPLEMENTATION
    logger.info("r-softmax in %d of %d attention layers: %s", len(chosen), len(modules), chosen)
    return model


def _clear_marks(modules: list[nn.Module]) -> None:
    for module in modules:
        if hasattr(module, RATE_ATTR):
            delattr(module, RATE_ATTR)
        unbind_adapter(module)


def unpatch_model(model: PreTrainedModel) -> PreTrainedModel:
    """Restores plain softmax and the attention implementation the model had before :func:`patch_model`."""
    modules = attention_modules(model)
    _clear_marks(modules)
    settings = getattr(model.config, CONFIG_KEY, None)
    if settings:
        if any(dispatches_through_registry(type(module)) for module in modules):
            model.set_attn_implementation(settings.get("original_attn_implementation") or "eager")
        del model.config.rsoftmax
    if getattr(model.config, "attn_implementation", None) == ATTN_IMPLEMENTATION:
        del model.config.attn_implementation
    return model


def patched_layers(model: nn.Module) -> dict[int, float | list[float]]:
    """Maps each patched layer's index to its rate (a list of per-head rates for a tensor rate)."""
    result = {}
    for index, module in enumerate(attention_modules(model)):
        rate = getattr(module, RATE_ATTR, None)
        if rate is not None:
            result[index] = rate.flatten().tolist() if isinstance(rate, Tensor) else rate
    return result


def restore_settings(model: nn.Module) -> nn.Module:
    """Patches ``model`` as its ``config.rsoftmax`` says, if it carries settings; otherwise leaves it alone."""
    settings = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not settings:
        return model
    rates = settings["r"]
    if any(isinstance(rate, list) for rate in rates):
        heads = max(len(rate) for rate in rates if isinstance(rate, list))
        rates = torch.tensor([rate if isinstance(rate, list) else [rate] * heads for rate in rates])
    return patch_model(model, r=rates, layers=settings["layers"])


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
    return restore_settings(model_class.from_pretrained(path, **kwargs))


def _install_from_pretrained_hook() -> None:
    """Makes ``from_pretrained`` of every transformers model restore the r-softmax settings its config carries."""
    original = PreTrainedModel.from_pretrained.__func__
    if getattr(original, "_rsoftmax_hook", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        if getattr(model.config, CONFIG_KEY, None):
            restore_settings(model)
            logger.info("restored r-softmax from the checkpoint's config: layers %s", patched_layers(model))
        return model

    from_pretrained._rsoftmax_hook = True
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


_install_from_pretrained_hook()
