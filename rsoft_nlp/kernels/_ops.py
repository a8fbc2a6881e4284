"""Shared plumbing for the fused r-softmax ops: one forward op, one backward op, autograd between them.

Each backend provides two functions over a contiguous ``(rows, k_len)`` matrix:

* ``forward(scores, r, eps) -> (probs, stats, argmax)`` where ``r`` is ``(rows,)`` in the compute dtype, ``stats``
  is ``(rows, 3)`` in the compute dtype holding the shift (row max, or 0 when it is not finite), the threshold ``t``
  and the normaliser ``S``, and ``argmax`` is ``(rows,)`` int64, -1 where the max is not finite.
* ``backward(grad, scores, stats, argmax) -> grad_scores`` with ``t`` held constant.

:func:`define_fused_op` turns such a pair into ``torch.library`` custom ops with a fake kernel (so
``torch.compile`` can trace them) and a registered autograd formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ForwardFn = Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]]
BackwardFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def define_fused_op(name: str, forward: ForwardFn, backward: BackwardFn, device_types: str | None = None):
    """Registers ``rsoft_nlp::{name}`` and ``rsoft_nlp::{name}_backward`` and returns the forward op.

    Args:
        name: Op name inside the ``rsoft_nlp`` namespace.
        forward: The backend's forward function (see the module docstring).
        backward: The backend's backward function.
        device_types: Restricts the kernels to a device type (e.g. ``"cpu"``); ``None`` registers them for all.

    Returns:
        The forward custom op, called as ``op(scores, r, eps)`` and returning ``(probs, stats, argmax)``.
    """

    @torch.library.custom_op(f"rsoft_nlp::{name}", mutates_args=(), device_types=device_types)
    def fused_forward(scores: Tensor, r: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return forward(scores, r, eps)

    @fused_forward.register_fake
    def _(scores, r, eps):
        rows = scores.shape[0]
        stats = scores.new_empty((rows, 3), dtype=compute_dtype(scores.dtype))
        return torch.empty_like(scores), stats, scores.new_empty((rows,), dtype=torch.long)

    @torch.library.custom_op(f"rsoft_nlp::{name}_backward", mutates_args=(), device_types=device_types)
    def fused_backward(grad: Tensor, scores: Tensor, stats: Tensor, argmax: Tensor) -> Tensor:
        return backward(grad, scores, stats, argmax)

    @fused_backward.register_fake
    def _(grad, scores, stats, argmax):
        return torch.empty_like(scores)

    def setup_context(ctx, inputs, output):
        scores, _, _ = inputs
        _, stats, argmax = output
        # NOTE: the input is kept instead of the output: e_i and w_i cannot be recovered from p_i alone, and
        # recomputing them from the scores keeps the gradient accurate for bf16/fp16 outputs.
        ctx.save_for_backward(scores, stats, argmax)
        ctx.mark_non_differentiable(stats, argmax)

    def backward_formula(ctx, grad_probs, grad_stats, grad_argmax):
        scores, stats, argmax = ctx.saved_tensors
        if grad_probs is None:
            return None, None, None
        return fused_backward(grad_probs.contiguous(), scores, stats, argmax), None, None

    fused_forward.register_autograd(backward_formula, setup_context=setup_context)
    return fused_forward
