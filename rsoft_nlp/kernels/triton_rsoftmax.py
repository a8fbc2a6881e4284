"""The fused Triton kernel for r-softmax: one program per row, the whole row held in one block.

The quantile's order statistics come from ``tl.sort`` over the row (masked keys sort last as +inf), which is
O(k log^2 k) work per row but runs in registers and needs no scratch memory. Rows up to ``MAX_K_LEN`` keys fit.
On a machine without a GPU the kernel runs on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rsoft_nlp.kernels._ops import compute_dtype, define_fused_op

MAX_K_LEN = 16384


@triton.jit
def _forward_kernel(x_ptr, r_ptr, eps_ptr, out_ptr, stats_ptr, argmax_ptr, k_len, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < k_len
    rate = tl.load(r_ptr + row)
    eps = tl.load(eps_ptr)
    x = tl.load(x_ptr + row * k_len + cols, mask=inside, other=-float("inf")).to(rate.dtype)

    top = tl.max(x, axis=0)
    top_index = tl.argmax(x, axis=0, tie_break_left=True)
    finite_top = (top > -float("inf")) & (top < float("inf"))
    shift = tl.where(finite_top, top, 0.0).to(rate.dtype)
    z = x - shift
    e = tl.exp(z)
    unmasked = inside & (e > 0)
    n = tl.sum(unmasked.to(tl.int32), axis=0)

    # Unmasked z's first, ascending; masked keys and padding lanes last as +inf.
    ordered = tl.sort(tl.where(unmasked, z, float("inf")), dim=0)
    position = tl.maximum(n - 1, 0).to(rate.dtype) * rate
    lo = tl.floor(position)
    frac = position - lo
    lo_index = lo.to(tl.int32)
    hi_index = tl.minimum(lo_index + 1, tl.maximum(n - 1, 0))
    q_lo = tl.sum(tl.where(cols == lo_index, ordered, 0.0), axis=0)
    q_hi = tl.sum(tl.where(cols == hi_index, ordered, 0.0), axis=0)
    quantile = tl.where(frac > 0, q_lo + frac * (q_hi - q_lo), q_lo)
    quantile = tl.where(n > 0, quantile, 0.0)
    t = -quantile + eps

    weighted = tl.where(inside, tl.maximum(z + t, 0.0) * e, 0.0)
    total = tl.sum(weighted, axis=0)
    probs = weighted / tl.where(total == 0, 1.0, total)
    tl.store(out_ptr + row * k_len + cols, probs.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(stats_ptr + row * 3, shift)
    tl.store(stats_ptr + row * 3 + 1, t)
    tl.store(stats_ptr + row * 3 + 2, total)
    tl.store(argmax_ptr + row, tl.where(finite_top, top_index.to(tl.int64), -1))


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, stats_ptr, argmax_ptr, out_ptr, k_len, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < k_len
    shift = tl.load(stats_ptr + row * 3)
    t = tl.load(stats_ptr + row * 3 + 1)
    total = tl.load(stats_ptr + row * 3 + 2)
    top_index = tl.load(argmax_ptr + row)
    x = tl.load(x_ptr + row * k_len + cols, mask=inside, other=-float("inf")).to(shift.dtype)
    g = tl.load(grad_ptr + row * k_len + cols, mask=inside, other=0.0).to(shift.dtype)

    z = x - shift
    e = tl.exp(z)
    lifted = z + t
    w = tl.maximum(lifted, 0.0)
    safe_total = tl.where(total == 0, 1.0, total)
    gp = tl.sum(tl.where(inside, g * (w * e / safe_total), 0.0), axis=0)
    slope = tl.where(inside, e * (tl.where(lifted > 0, 1.0, 0.0) + w), 0.0)
    dz = (g - gp) / safe_total * slope
    dz_sum = tl.sum(dz, axis=0)
    dx = dz - tl.where(cols == top_index, dz_sum, 0.0)
    dx = tl.where(total == 0, 0.0, dx)
    tl.store(out_ptr + row * k_len + cols, dx.to(out_ptr.dtype.element_ty), mask=inside)


def _block(k_len: int) -> int:
    if k_len > MAX_K_LEN:
        raise ValueError(f"`scores` must have at most {MAX_K_LEN} keys per row for the Triton kernel, got {k_len}")
    return triton.next_power_of_2(max(k_len, 1))


def _forward(scores: Tensor, r: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    rows, k_len = scores.shape
    acc = compute_dtype(scores.dtype)
    rates = r.to(acc).contiguous()
    eps_tensor = torch.tensor([eps], dtype=acc, device=scores.device)
    probs = torch.empty_like(scores)
    stats = torch.empty((rows, 3), dtype=acc, device=scores.device)
    argmax = torch.empty((rows,), dtype=torch.long, device=scores.device)
    if rows > 0:
        _forward_kernel[(rows,)](scores, rates, eps_tensor, probs, stats, argmax, k_len, BLOCK=_block(k_len))
    return probs, stats, argmax


def _backward(grad: Tensor, scores: Tensor, stats: Tensor, argmax: Tensor) -> Tensor:
    rows, k_len = scores.shape
    grad_scores = torch.empty_like(scores)
    if rows > 0:
        _backward_kernel[(rows,)](
            grad.to(scores.dtype).contiguous(), scores, stats, argmax, grad_scores, k_len, BLOCK=_block(k_len)
        )
    return grad_scores


r_softmax_triton = define_fused_op("r_softmax_triton", _forward, _backward)
