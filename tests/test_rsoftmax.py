import math

import pytest
import torch

from rsoft_nlp import RSoftmax, r_softmax, t_softmax

T = torch.tensor


def threshold_of(x, r):
    """t = eps - Q_r(x - max x) over each row's unmasked keys, from torch.quantile."""
    z = x.detach() - x.detach().max(dim=-1, keepdim=True).values
    r = torch.as_tensor(r, dtype=x.dtype).expand(x.shape[:-1] + (1,)).reshape(-1)
    rows = [row[torch.isfinite(row) & (row.exp() > 0)] for row in z.reshape(-1, x.shape[-1])]
    q = torch.stack([torch.quantile(row, rr.item()) for row, rr in zip(rows, r, strict=True)])
    return -q.reshape(x.shape[:-1] + (1,)) + 1e-8


def reference_rule(x, r):
    """The paper's rule written out with torch.quantile, for rows without masked keys."""
    z = x - x.max(dim=-1, keepdim=True).values
    w = torch.relu(z + threshold_of(x, r)) * torch.exp(z)
    return w / w.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    "scores, r, expected",
    [
        ([[3, 2, 1], [4, 5, 6]], 0.5, [[1, 0, 0], [0, 0, 1]]),
        ([[3, 2, 1, 1], [4, 6, 6, 5]], 0.5, [[0.8908, 0.1092, 0, 0], [0, 0.5, 0.5, 0]]),
        ([[3, 2, 1, 1], [4, 6, 6, 5]], 0.75, [[1, 0, 0, 0], [0, 0.5, 0.5, 0]]),
        ([[3, 2, 1, 1], [4, 6, 5, 5]], [[0.75], [0.25]], [[1, 0, 0, 0], [0, 0.8717, 0.0641, 0.0641]]),
        ([[0, 0, 0, 0], [0, 0, 0, 0]], 0.5, [[0.25] * 4] * 2),
        ([[-2.4, -4.3, -1.3, -34.3], [-20.3, -2.3, -42.3, -1e-6]], 0.75, [[0, 0, 1, 0], [0, 0, 0, 1]]),
    ],
)
def test_reference_vectors(scores, r, expected):
    r = T(r) if isinstance(r, list) else r
    out = r_softmax(T(scores, dtype=torch.float32), r)
    torch.testing.assert_close(out, T(expected, dtype=torch.float32), atol=1e-4, rtol=0)


@pytest.mark.parametrize("r", [0.0, 0.1, 0.37, 0.5, 0.8, 1.0])
def test_values_and_gradients_match_the_reference_rule(r):
    torch.manual_seed(0)
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(6, 9, dtype=torch.float64)

    out = r_softmax(x, r)
    ref = reference_rule(x_ref, r)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)

    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("r", [0.05, 0.3, 0.6, 1.0])
def test_gradcheck_float64(r):
    # The threshold is a constant for autograd, so r-softmax's Jacobian is t-softmax's at the row's own t.
    # Rates are chosen so that no key sits on the threshold's kink, where finite differences cross it.
    torch.manual_seed(1)
    x = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    t = threshold_of(x, r)
    assert torch.autograd.gradcheck(lambda s: t_softmax(s, t), (x,))

    jac_r = torch.autograd.functional.jacobian(lambda s: r_softmax(s, r), x)
    jac_t = torch.autograd.functional.jacobian(lambda s: t_softmax(s, t), x)
    torch.testing.assert_close(jac_r, jac_t, atol=1e-12, rtol=0)


def test_gradcheck_with_masked_keys_and_per_row_r():
    torch.manual_seed(2)
    x = torch.randn(4, 8, dtype=torch.float64)
    x[0, 5:] = -math.inf
    x[1, :2] = torch.finfo(torch.float64).min
    x.requires_grad_(True)
    r = T([[0.3], [0.55], [0.7], [0.9]], dtype=torch.float64)
    t = threshold_of(x, r)
    torch.testing.assert_close(r_softmax(x, r), t_softmax(x, t), atol=1e-12, rtol=0)

    jac_r = torch.autograd.functional.jacobian(lambda s: r_softmax(s, r), x)
    jac_t = torch.autograd.functional.jacobian(lambda s: t_softmax(s, t), x)
    torch.testing.assert_close(jac_r, jac_t, atol=1e-12, rtol=0)
    assert torch.isfinite(jac_r).all()

    # gradcheck needs finite inputs: -1e4 below the max underflows exp in float64 too, so it is still masked.
    finite = torch.where(torch.isinf(x), -1e4, x).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: t_softmax(s, t), (finite,))


@pytest.mark.parametrize("mask_value", [-math.inf, torch.finfo(torch.float32).min, -1e4])
def test_masked_keys_are_zero_and_do_not_count_toward_r(mask_value):
    torch.manual_seed(3)
    sentence = torch.randn(5)
    alone = r_softmax(sentence[None], 0.6)[0]

    for pad in (1, 3, 11):
        padded = torch.cat([sentence, torch.full((pad,), 0.0)])
        additive = torch.cat([torch.zeros(5), torch.full((pad,), mask_value)])
        out = r_softmax((padded + additive)[None], 0.6)[0]
        assert (out[5:] == 0).all()
        torch.testing.assert_close(out[:5], alone, atol=1e-7, rtol=0)


def test_four_d_per_head_r_and_any_dim():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, 6)
    r = T([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    out = r_softmax(x, r)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 5))
    for head in range(3):
        torch.testing.assert_close(out[:, head], r_softmax(x[:, head], r[0, head].item()))

    along_q = r_softmax(x, 0.5, dim=2)
    torch.testing.assert_close(along_q, r_softmax(x.transpose(2, 3), 0.5).transpose(2, 3))


def test_zero_fraction_follows_r():
    torch.manual_seed(5)
    x = torch.randn(200, 101)
    for r in (0.2, 0.5, 0.8):
        zeros = (r_softmax(x, r) == 0).float().mean(-1)
        assert (zeros >= r - 0.011).all() and (zeros <= r + 0.011).all()


@pytest.mark.parametrize(
    "scores",
    [
        [[-math.inf] * 4],
        [[1.0, -math.inf, -math.inf, -math.inf]],
        [[2.0, 2.0, 2.0, 1.0]],
        [[7.0]],
        [[1e30, -1e30, 0.0, 3.0]],
    ],
)
@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_no_nan_or_inf_in_values_or_gradients(scores, r):
    x = T(scores, requires_grad=True)
    out = r_softmax(x, r)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    total = out.sum().item()
    assert total == 0.0 if math.isinf(scores[0][0]) and scores[0][0] < 0 else abs(total - 1) < 1e-6


def test_fully_masked_row_is_all_zero():
    out = r_softmax(T([[-math.inf, -math.inf], [0.0, 1.0]]), 0.5)
    assert (out[0] == 0).all() and out[1].sum() == 1


def test_single_key_and_r_one_are_one_hot_on_the_max():
    assert r_softmax(T([[3.0]]), 0.7).item() == 1.0
    torch.testing.assert_close(r_softmax(T([[1.0, 4.0, 2.0]]), 1.0), T([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    torch.manual_seed(6)
    x = torch.randn(4, 3, 16) * 4
    x[..., 10:] = torch.finfo(dtype).min
    out = r_softmax(x.to(dtype), 0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), r_softmax(x.to(dtype).float(), 0.5), atol=2e-3, rtol=0)
    assert (out[..., 10:] == 0).all()

    x = x.to(dtype).requires_grad_(True)
    r_softmax(x, 0.5).sum().backward()
    assert torch.isfinite(x.grad.float()).all()


def test_many_rows_use_linear_memory():
    x = torch.randn(64_000, 12)
    out = r_softmax(x, 0.5)
    torch.testing.assert_close(out.sum(-1), torch.ones(64_000))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), T([0.2, 1.2]), T([float("nan")])])
def test_r_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="`r` must lie in \\[0, 1\\]"):
        r_softmax(torch.randn(2, 3), bad)


def test_r_that_does_not_broadcast_over_rows_is_rejected():
    with pytest.raises(ValueError, match="broadcast over the rows"):
        r_softmax(torch.randn(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(TypeError, match="`r` must be a float or a tensor"):
        r_softmax(torch.randn(2, 3), "0.5")


def test_t_softmax_and_module():
    x = T([[3.0, 2.0, 1.0, 1.0]])
    torch.testing.assert_close(t_softmax(x, 1.5 + 1e-8), r_softmax(x, 0.5))
    with pytest.raises(ValueError, match="`t` must be > 0"):
        t_softmax(x, 0.0)
    module = RSoftmax(r=0.5)
    torch.testing.assert_close(module(x), r_softmax(x, 0.5))
    assert "r=0.5" in repr(module)
    with pytest.raises(ValueError, match="`r` must lie in"):
        RSoftmax(r=2.0)
