r"""The r-softmax operator: softmax with a controllable sparsity rate.

r-softmax (Bałazy, Struski, Śmieja and Tabor, "r-softmax: Generalized Softmax with Controllable Sparsity Rate",
arXiv 2304.05243) maps a row of scores :math:`x` over its unmasked keys to probabilities, about a fraction
:math:`r` of which are exactly zero:

.. math::

    z_i = x_i - \max_j x_j, \qquad
    t = \varepsilon - Q_r(z), \qquad
    w_i = \operatorname{relu}(z_i + t), \qquad
    p_i = \frac{w_i\, e^{z_i}}{\sum_j w_j\, e^{z_j}},

where :math:`Q_r(z)` is the r-quantile of the row's unmasked :math:`z` with linear interpolation (position
:math:`r\,(n-1)` among the :math:`n` sorted unmasked values) and :math:`\varepsilon = 10^{-8}`. The threshold
:math:`t` is treated as a constant by autograd; gradients flow through :math:`z`, including its max.

``t_softmax`` is the same map with the threshold :math:`t > 0` given directly.

A key is *masked* when :math:`e^{z_i}` underflows to zero in the compute dtype: a score of ``-inf``, a score plus
``torch.finfo(dtype).min`` as transformers' additive masks make, or anything far enough below the row's max.
Masked keys get probability exactly 0. ``r = 0`` is not softmax: the smallest unmasked key sits on the threshold and
every other key is reweighted; use plain softmax when no sparsity is wanted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rsoft_nlp.kernels import fused_r_softmax, resolve_backend

EPS = 1e-8

__all__ = ["RSoftmax", "r_softmax", "t_softmax"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_r(r: float | Tensor, scores: Tensor, dim: int) -> Tensor:
    """Validates ``r`` and returns it as a tensor of the row shape (``scores.shape`` with 1 at ``dim``)."""
    if isinstance(r, bool) or not isinstance(r, (int, float, Tensor)):
        raise TypeError(f"`r` must be a float or a tensor, got {type(r).__name__}")
    if isinstance(r, Tensor):
        if r.is_floating_point() is False and r.dtype != torch.bool:
            r = r.to(torch.float32)
        if not torch.compiler.is_compiling():
            bad = torch.isnan(r) | (r < 0) | (r > 1)
            if bool(bad.any()):
                raise ValueError(f"`r` must lie in [0, 1], got {r[bad].flatten()[0].item()!r} among its values")
    elif math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ValueError(f"`r` must lie in [0, 1], got {r!r}")

    row_shape = list(scores.shape)
    row_shape[dim] = 1
    r = torch.as_tensor(r, dtype=_compute_dtype(scores.dtype), device=scores.device)
    try:
        return torch.broadcast_to(r, row_shape)
    except RuntimeError:
        raise ValueError(
            f"`r` must broadcast over the rows of `scores` (shape {tuple(row_shape)}, size 1 along `dim`), "
            f"got shape {tuple(r.shape)}"
        ) from None


def _quantile_threshold(z: Tensor, unmasked: Tensor, r: Tensor) -> Tensor:
    """Threshold ``t = eps - Q_r(z)`` over the unmasked keys of each row along the last dimension.

    Args:
        z: Max-shifted scores, ``(rows..., k_len)``; masked keys are ``-inf`` or underflow.
        unmasked: Boolean mask of the keys that count, same shape as ``z``.
        r: Sparsity rate per row, ``(rows..., 1)``.

    Returns:
        ``t`` of shape ``(rows..., 1)``, detached.
    """
    k_len = z.shape[-1]

    # Masked keys sort first as -inf, so the unmasked ones fill positions [k_len - n, k_len).
    ordered = torch.sort(z.masked_fill(~unmasked, -math.inf), dim=-1).values
    n = unmasked.sum(dim=-1, keepdim=True)
    position = (n - 1).clamp_min(0).to(r.dtype) * r
    lo = position.floor()
    frac = position - lo
    lo_index = (k_len - n).clamp_max(k_len - 1) + lo.long()
    hi_index = (lo_index + 1).clamp_max(k_len - 1)
    q_lo = ordered.gather(-1, lo_index)
    q_hi = ordered.gather(-1, hi_index)

    # Where hi == lo (r = 1 or a single key), frac is 0 and the hi term must not add inf * 0.
    quantile = torch.where(frac > 0, q_lo + frac * (q_hi - q_lo), q_lo)
    quantile = torch.where(n > 0, quantile, torch.zeros_like(quantile))
    return -quantile + EPS


def _shifted_scores(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``z = x - max x`` along the last dimension and ``exp(z)``; fully masked rows keep ``z = -inf``."""
    row_max = torch.max(scores, dim=-1, keepdim=True).values
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    z = scores - row_max
    return z, torch.exp(z)


def _normalise(weighted: Tensor) -> Tensor:
    total = weighted.sum(dim=-1, keepdim=True)
    # NOTE: a fully masked row has total 0; it gets all-zero probabilities (and zero gradients) instead of NaN.
    # A NaN total (NaN among the scores) stays NaN, as softmax would give.
    return weighted / torch.where(total == 0, torch.ones_like(total), total)


def _t_softmax_last(scores: Tensor, t: Tensor) -> Tensor:
    z, e = _shifted_scores(scores)
    return _normalise(torch.relu(z + t) * e)


def r_softmax(scores: Tensor, r: float | Tensor, dim: int = -1, backend: str | None = None) -> Tensor:
    """r-softmax of ``scores`` along ``dim``.

    Args:
        scores: Scores of any shape, e.g. ``(batch, heads, q_len, k_len)`` with ``dim=-1``.
        r: Sparsity rate in [0, 1]: a float, or a tensor that broadcasts over the rows (``scores.shape`` with size 1
            at ``dim``), e.g. ``(1, heads, 1, 1)`` for one rate per head.
        dim: The dimension that holds the keys.
        backend: ``"auto"``, ``"torch"`` (this module's reference path), ``"cpu"`` (fused C++ kernel) or
            ``"triton"`` (fused Triton kernel); ``None`` reads the environment variable ``RSOFT_BACKEND`` and
            defaults to ``"auto"``. See :mod:`rsoft_nlp.kernels`.

    Returns:
        Probabilities of the same shape and dtype as ``scores``: each row sums to 1 over its unmasked keys, masked
        keys are exactly 0, and a row with every key masked is all zeros. fp16 and bf16 inputs are computed in
        float32.

    Raises:
        ValueError: If ``r`` is NaN, outside [0, 1], or does not broadcast over the rows.
        TypeError: If ``r`` is neither a number nor a tensor.
        RuntimeError: If a forced ``backend`` cannot run on ``scores``.
    """
    dim = _check_dim(scores, dim)
    r = _check_r(r, scores, dim)
    chosen = resolve_backend(backend, scores)
    if chosen != "torch":
        return fused_r_softmax(scores, r, dim, chosen, EPS)
    x = scores.to(_compute_dtype(scores.dtype)).movedim(dim, -1)

    z, e = _shifted_scores(x)
    with torch.no_grad():
        # NOTE: the reference implementation counts masked keys toward r (after moving them to the top of the row),
        # so a sentence's output there depends on how much padding its batch has. Here r counts unmasked keys only.
        t = _quantile_threshold(z.detach(), e.detach() > 0, r.movedim(dim, -1))

    return _normalise(torch.relu(z + t) * e).movedim(-1, dim).to(scores.dtype)


def t_softmax(scores: Tensor, t: float | Tensor, dim: int = -1) -> Tensor:
    """Thresholded softmax: ``relu(x - max x + t) * exp(x - max x)``, normalised along ``dim``.

    Args:
        scores: Scores of any shape.
        t: Threshold, strictly positive: a float or a tensor that broadcasts over the rows (size 1 at ``dim``).
            It is treated as a constant by autograd.
        dim: The dimension that holds the keys.

    Returns:
        Probabilities of the same shape and dtype as ``scores``.

    Raises:
        ValueError: If ``t`` is not strictly positive or does not broadcast over the rows.
    """
    dim = _check_dim(scores, dim)
    row_shape = list(scores.shape)
    row_shape[dim] = 1
    t = torch.as_tensor(t, dtype=_compute_dtype(scores.dtype), device=scores.device).detach()
    if not torch.compiler.is_compiling() and not bool((t > 0).all()):
        raise ValueError(f"`t` must be > 0, got minimum {t.min().item()!r}")
    try:
        t = torch.broadcast_to(t, row_shape)
    except RuntimeError:
        raise ValueError(
            f"`t` must broadcast over the rows of `scores` (shape {tuple(row_shape)}), got shape {tuple(t.shape)}"
        ) from None
    x = scores.to(_compute_dtype(scores.dtype)).movedim(dim, -1)
    return _t_softmax_last(x, t.movedim(dim, -1)).movedim(-1, dim).to(scores.dtype)


def _check_dim(scores: Tensor, dim: int) -> int:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError(f"`scores` must be a floating-point tensor, got {getattr(scores, 'dtype', type(scores))}")
    if scores.ndim == 0:
        raise ValueError("`scores` must have at least one dimension, got a scalar")
    if not -scores.ndim <= dim < scores.ndim:
        raise ValueError(
            f"`dim` must lie in [{-scores.ndim}, {scores.ndim - 1}] for a {scores.ndim}-D input, got {dim}"
        )
    return dim % scores.ndim


class RSoftmax(nn.Module):
    """Module form of :func:`r_softmax`.

    Args:
        r: Sparsity rate in [0, 1], a float or a tensor that broadcasts over the rows.
        dim: The dimension that holds the keys.
        backend: Which implementation computes it (see :func:`r_softmax`).
    """

    def __init__(self, r: float | Tensor = 0.5, dim: int = -1, backend: str | None = None):
        super().__init__()
        if isinstance(r, Tensor):
            self.register_buffer("r", r.detach().clone(), persistent=False)
        else:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 <= r <= 1.0:
                raise ValueError(f"`r` must lie in [0, 1], got {r!r}")
            self.r = float(r)
        self.dim = dim
        self.backend = backend

    def forward(self, scores: Tensor, r: float | Tensor | None = None) -> Tensor:
        return r_softmax(scores, self.r if r is None else r, dim=self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        r = self.r if isinstance(self.r, float) else f"tensor of shape {tuple(self.r.shape)}"
        return f"r={r}, dim={self.dim}"
