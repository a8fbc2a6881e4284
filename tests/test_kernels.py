"""The fused r-softmax kernels against the reference path: properties, gradients, dispatch, torch.compile."""

import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rsoft_nlp import kernels, r_softmax, t_softmax
from rsoft_nlp.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
CPU_READY = cpu.missing_reason() is None
needs_cpu_kernel = pytest.mark.skipif(not CPU_READY, reason="the fused CPU kernel cannot be built here")
PATHS = ["torch", "cpu"] if CPU_READY else ["torch"]
# Tolerances on values between paths: 1e-6 for the float32/float64 computation, one output ulp for half types.
VALUE_ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def threshold_of(x, r):
    """t = eps - Q_r(x - max x) over each row's unmasked keys (last dimension), from torch.quantile."""
    z = x.detach().double() - x.detach().double().max(dim=-1, keepdim=True).values
    r = torch.as_tensor(r, dtype=torch.float64).expand(x.shape[:-1] + (1,)).reshape(-1)
    rows = [row[torch.isfinite(row) & (row.exp() > 0)] for row in z.reshape(-1, x.shape[-1])]
    q = torch.stack([torch.quantile(row, rr.item()) for row, rr in zip(rows, r, strict=True)])
    return (-q.reshape(x.shape[:-1] + (1,)) + 1e-8).to(x.dtype)


def run_pytest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """pytest in a child process with `env`, from the repository root, output captured."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


@st.composite
def cases(draw):
    """Scores with masks, ties and padding, a rate (float or per-row tensor), a dim and a dtype."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    k_len = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        x = torch.randint(-2, 3, (*lead, k_len), generator=gen).to(torch.float64)  # (rows..., k_len), ties
    else:
        x = torch.randn((*lead, k_len), generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.5, 3.0, 10.0]))
    rows = x.reshape(-1, k_len)  # (rows, k_len), a view
    mask_value = draw(st.sampled_from([None, -math.inf, "finfo"]))
    if mask_value is not None:
        for row in rows:
            keep = k_len - math.floor(k_len * draw(st.floats(0.0, 1.0)))
            if mask_value == "finfo":
                row[keep:] += torch.finfo(dtype).min
            else:
                row[keep:] = -math.inf
    if draw(st.booleans()) and rows.shape[0] > 1:
        rows[0] = -math.inf
    x = x.to(dtype)

    if draw(st.booleans()):
        r = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])) if draw(st.booleans()) else draw(st.floats(0.0, 1.0))
    else:
        r = torch.rand((*lead, 1), generator=gen)  # (rows..., 1)
        r[r < 0.1] = 0.0
        r[r > 0.9] = 1.0
    dim = draw(st.integers(-x.ndim, x.ndim - 1))
    if dim % x.ndim != x.ndim - 1:
        x = x.movedim(-1, dim)
        r = r.movedim(-1, dim) if isinstance(r, torch.Tensor) else r
    return x, r, dim


def unmasked_keys(x, dim):
    """Keys whose exponential survives in the compute dtype, with the shifted scores, keys last."""
    z = x.movedim(dim, -1).double() if x.dtype == torch.float64 else x.movedim(dim, -1).float()
    top = z.max(dim=-1, keepdim=True).values
    z = z - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return z.exp() > 0, z


@settings(max_examples=120, deadline=None, derandomize=True)
@given(cases())
def test_properties_and_paths_agree(case):
    x, r, dim = case
    outputs, grads = {}, {}
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)
    for path in PATHS:
        leaf = x.clone().requires_grad_(True)
        out = r_softmax(leaf, r, dim=dim, backend=path)
        (out.float() * upstream.float()).sum().backward()
        outputs[path], grads[path] = out.detach(), leaf.grad
        assert out.dtype == x.dtype and out.shape == x.shape
        assert torch.isfinite(out).all()
        # NOTE: keys tied on the threshold have w = eps, so true gradients reach ~1/eps and overflow float16.
        assert x.dtype == torch.float16 or torch.isfinite(leaf.grad).all()

    unmasked, z = unmasked_keys(x, dim)
    n = unmasked.sum(-1)
    probs = outputs[PATHS[-1]].movedim(dim, -1)
    sums = probs.double().sum(-1)
    expected = (n > 0).double()
    assert torch.allclose(sums, expected, atol=2e-2 if x.dtype in (torch.bfloat16, torch.float16) else 1e-6)
    assert (probs[~unmasked] == 0).all()
    # Keys strictly below the quantile all get zero weight (exact zeros may exceed that count, never fall short).
    rates = torch.as_tensor(r, dtype=torch.float64).expand(x.shape).movedim(dim, -1)[..., 0]
    for row, keep, zrow, rate in zip(probs.reshape(-1, x.shape[dim]), unmasked.reshape(-1, x.shape[dim]),
                                     z.reshape(-1, x.shape[dim]), rates.reshape(-1), strict=True):  # fmt: skip
        if keep.any():
            quantile = torch.quantile(zrow[keep].double(), rate.item())
            below = (zrow[keep].double() < quantile - 1e-6 * (1 + quantile.abs())).sum()
            assert (row[keep] == 0).sum() >= below

    if "cpu" in outputs:
        torch.testing.assert_close(outputs["cpu"], outputs["torch"], atol=VALUE_ATOL[x.dtype], rtol=0)
        # Keys at the threshold make gradients scale like 1/eps, so the tolerance is relative to the row's largest.
        finite = torch.isfinite(grads["torch"])
        assert torch.equal(finite, torch.isfinite(grads["cpu"]))
        ref_grad = grads["torch"].double().where(finite, 0)
        scale = ref_grad.abs().amax(dim=dim, keepdim=True) + 1
        diff = (grads["cpu"].double().where(finite, 0) - ref_grad).abs()
        assert (diff <= GRAD_RTOL[x.dtype] * scale).all()


@needs_cpu_kernel
@pytest.mark.parametrize("r", [0.05, 0.3, 0.6, 1.0])
def test_fused_jacobian_is_t_softmax_jacobian_at_its_own_threshold(r):
    # The threshold is a constant for autograd: the fused Jacobian must equal t-softmax's at the row's t, and
    # gradcheck confirms t-softmax's Jacobian by finite differences. No key sits on the kink at these rates.
    torch.manual_seed(11)
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    x[0, 1, 4:] = -math.inf
    x[2, 0, :3] = torch.finfo(torch.float64).min
    x.requires_grad_(True)
    t = threshold_of(x, r)
    jac_fused = torch.autograd.functional.jacobian(lambda s: r_softmax(s, r, backend="cpu"), x)
    jac_ref = torch.autograd.functional.jacobian(lambda s: r_softmax(s, r, backend="torch"), x)
    jac_t = torch.autograd.functional.jacobian(lambda s: t_softmax(s, t), x)
    torch.testing.assert_close(jac_fused, jac_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(jac_fused, jac_t, atol=1e-12, rtol=0)
    finite = torch.where(torch.isinf(x), -1e4, x).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: t_softmax(s, t), (finite,))


@needs_cpu_kernel
def test_custom_op_registration():
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    r = torch.rand(5, dtype=torch.float64)
    torch.library.opcheck(cpu.r_softmax_cpu, (x, r, 1e-8))


@needs_cpu_kernel
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(12)
    x = torch.randn(2, 3, 6, 10)
    x[1, :, :, 7:] += torch.finfo(torch.float32).min
    r = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1)

    def attention_like(scores, rates):
        return r_softmax(scores * 0.5, rates, backend="cpu") * 2.0

    eager = attention_like(x, r)
    compiled = torch.compile(attention_like, fullgraph=True, backend="aot_eager")(x, r)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


def test_backend_choice_env_var_and_errors(monkeypatch, caplog):
    x = torch.randn(2, 5)
    assert kernels.resolve_backend("torch", x) == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.resolve_backend(None, x) == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        r_softmax(x, 0.5)
    monkeypatch.delenv(kernels.ENV_VAR)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="`backend` 'triton' cannot run here"):
        r_softmax(x, 0.5, backend="triton")

    # Without a toolchain, "auto" falls back to the reference path and says so once; forcing "cpu" fails loudly.
    monkeypatch.setattr(cpu, "missing_reason", lambda: "no C++ compiler (c++ or g++) on PATH")
    monkeypatch.setattr(kernels, "_logged", set())
    with caplog.at_level(logging.INFO, logger="rsoft_nlp.kernels"):
        assert kernels.resolve_backend("auto", x) == "torch"
        assert kernels.resolve_backend(None, x) == "torch"
    assert [rec.message for rec in caplog.records].count(
        "r-softmax backend: reference PyTorch path on cpu (no C++ compiler (c++ or g++) on PATH)"
    ) == 1
    with pytest.raises(RuntimeError, match="`backend` 'cpu' cannot run here: no C\\+\\+ compiler"):
        r_softmax(x, 0.5, backend="cpu")


LONG_ROWS = [(31, 0.2), (64, 0.5), (100, 0.0), (128, 0.2), (128, 1.0), (257, 0.35), (512, 0.2), (512, None)]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("k_len", "rate"), LONG_ROWS)
def test_attention_length_rows_match_the_reference_path(k_len, rate, dtype):
    # Rows of attention length take several selection rounds; the property test above covers short rows.
    gen = torch.Generator().manual_seed(k_len)
    x = torch.randn(4, 3, 6, k_len, generator=gen, dtype=torch.float64) * 3  # (batch, heads, q_len, k_len)
    x[0, :, :, k_len // 3 :] += torch.finfo(torch.float32).min  # padded batch entry, additive mask
    x[1, :, :, k_len - 5 :] = -math.inf
    x[2, 0] = torch.randint(-2, 3, (6, k_len), generator=gen).double()  # ties everywhere
    x[2, 1, :, : k_len // 2] = 7.0  # a tied maximum over half the row
    x[3, 2, 0] = -math.inf  # a fully masked row
    x = x.to(dtype)
    r = torch.rand(4, 3, 6, 1, generator=gen) if rate is None else rate
    upstream = torch.randn(x.shape, generator=gen).to(dtype)
    results = {}
    for path in ("torch", "cpu"):
        leaf = x.clone().requires_grad_(True)
        out = r_softmax(leaf, r, backend=path)
        (out.float() * upstream.float()).sum().backward()
        results[path] = (out, leaf.grad)
    (ref, ref_grad), (fused, fused_grad) = results["torch"], results["cpu"]
    torch.testing.assert_close(fused, ref, atol=VALUE_ATOL[dtype], rtol=0)
    assert torch.equal(fused == 0, ref == 0) or dtype != torch.float32
    scale = ref_grad.double().abs().amax(dim=-1, keepdim=True) + 1
    assert ((fused_grad.double() - ref_grad.double()).abs() <= GRAD_RTOL[dtype] * scale).all()
    assert (fused[3, 2, 0] == 0).all() and (fused_grad[3, 2, 0] == 0).all()


def selection_rows(k_len: int, gen: torch.Generator) -> torch.Tensor:
    """Rows that stress the selection of order statistics: ties, few distinct values, sorted runs, clusters.

    Unmasked values stay within 60 of the row's max, far from where exp underflows (which would mask them).
    """
    base = torch.randn(k_len, generator=gen, dtype=torch.float64)
    rows = [
        base * 3,
        torch.randint(0, 3, (k_len,), generator=gen).double(),  # three distinct values
        torch.arange(k_len).double() * (60 / k_len),  # ascending
        -torch.arange(k_len).double() * (60 / k_len),  # descending
        torch.zeros(k_len, dtype=torch.float64),  # all tied
        (base.exp() * 10).clamp(max=60),  # a long tail
        torch.randint(0, 4, (k_len,), generator=gen).double() * 10 + base * 1e-3,  # tight clusters
        torch.where(torch.arange(k_len) % 2 == 0, base, torch.full_like(base, 1.5)),  # half tied in the middle
    ]
    rows = torch.stack(rows)
    masked = rows.clone()
    masked[:, ::3] += torch.finfo(torch.float32).min  # every third key masked
    return torch.cat([rows, masked]).float()


@needs_cpu_kernel
@pytest.mark.parametrize("k_len", [2, 16, 17, 32, 33, 48, 127, 128, 256, 1000, 2048, 20000])
def test_threshold_is_the_exact_interpolated_quantile(k_len):
    # Every row length and value pattern the selection treats differently: rows of one or two vectors, the sampled
    # search, rows long enough that quickselect has to finish after it, and rows too long for the sampled search.
    gen = torch.Generator().manual_seed(1000 + k_len)
    x = selection_rows(k_len, gen)
    rates = torch.tensor([0.0, 0.2, 0.5, 1.0, 0.37, 0.9, 0.05, 0.75])
    x = x.repeat(len(rates), 1)
    r = rates.repeat_interleave(len(x) // len(rates))
    eps = 1e-8
    _, stats, _ = cpu.load().forward(x, r, eps)
    z = x.double() - x.double().amax(dim=-1, keepdim=True)
    for row in range(len(x)):
        values = torch.sort(z[row][x[row] > torch.finfo(torch.float32).min / 2]).values.float()
        position = (len(values) - 1) * r[row]
        lo = int(torch.floor(position))
        frac = float(position - lo)
        quantile = values[lo] + frac * (values[min(lo + 1, len(values) - 1)] - values[lo])
        scale = values.abs().max() + 1
        assert abs(float(stats[row, 1]) - (eps - float(quantile))) <= 1e-6 * float(scale), (row, float(r[row]))


@needs_cpu_kernel
@pytest.mark.parametrize("k_len", [17, 48, 100, 128, 300])
def test_rows_with_infinite_scores_match_the_reference_path(k_len):
    # A +inf score (a float16 overflow, say) makes its row NaN on every path, wherever it sits relative to the keys
    # the selection samples; -inf keys are masked.
    gen = torch.Generator().manual_seed(k_len)
    x = torch.randn(7, k_len, generator=gen)
    x[0, 0::3] = math.inf
    x[1, 1] = math.inf
    x[2] = math.inf
    x[3, 1::2] = -math.inf
    x[3, 0::5] = math.inf
    x[4, -1] = math.inf
    x[5, 2::4] = math.inf
    x[6, 1::2] = -math.inf
    for r in (0.0, 0.5, 0.99, 1.0):
        fused = r_softmax(x, r, backend="cpu")
        ref = r_softmax(x, r, backend="torch")
        assert torch.equal(fused.isnan(), ref.isnan()), r
        torch.testing.assert_close(fused.nan_to_num(), ref.nan_to_num(), atol=1e-6, rtol=0)


ISA_CHECK = "from rsoft_nlp.kernels import cpu; print(cpu.describe())"


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
def test_every_instruction_set_build_passes_the_kernel_tests(isa):
    # The default build is the widest one this CPU runs; build each narrower one too and rerun the kernel tests on it.
    if isa not in cpu.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    env = dict(os.environ, RSOFT_CPU_ISA=isa, PYTHONPATH=str(ROOT))
    built = subprocess.run(
        [sys.executable, "-c", ISA_CHECK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert built.returncode == 0, built.stderr[-3000:]
    lanes = {"avx512": 16, "avx2": 8, "base": 1}[isa]
    assert built.stdout.strip() == f"{isa} build, {lanes} float32 lanes"
    if isa == cpu.supported_isas()[0]:
        return  # the default build, which the rest of this file already tests
    selection = " or ".join(
        [
            "properties_and_paths_agree",
            "attention_length_rows",
            "exact_interpolated_quantile",
            "infinite_scores",
            "jacobian",
            "edge_rows",
        ]
    )
    done = run_pytest(env, __file__, "-k", selection)
    assert done.returncode == 0, done.stdout[-3000:]


def test_cpu_isa_variable_is_checked(monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV_VAR, "sse9")
    with pytest.raises(RuntimeError, match="RSOFT_CPU_ISA must be one of auto, avx512, avx2, base, got 'sse9'"):
        cpu._isa()
    monkeypatch.setattr(cpu, "supported_isas", lambda: ["base"])
    monkeypatch.setenv(cpu.ISA_ENV_VAR, "AVX512")
    with pytest.raises(RuntimeError, match="RSOFT_CPU_ISA=avx512 cannot run here: this CPU and torch support base"):
        cpu._isa()
    monkeypatch.setenv(cpu.ISA_ENV_VAR, "auto")
    assert cpu._isa() == "base"


@needs_cpu_kernel
def test_auto_uses_the_fused_kernel_on_cpu_and_handles_edge_rows():
    x = torch.tensor([[-math.inf] * 3, [1.0, -math.inf, -math.inf], [2.0, 2.0, 1.0]], requires_grad=True)
    assert kernels.resolve_backend("auto", x) == "cpu"
    out = r_softmax(x, 0.5)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()
    torch.testing.assert_close(out, torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.5, 0.5, 0]]))
    assert r_softmax(torch.empty(0, 4), 0.5).shape == (0, 4)


TRITON_SCRIPT = textwrap.dedent(
    """
    import math, torch
    from rsoft_nlp import r_softmax
    gen = torch.Generator().manual_seed(13)
    for dtype, k_len, r in [(torch.float32, 7, 0.3), (torch.float64, 16, 0.5), (torch.float32, 33, None),
                            (torch.bfloat16, 12, 0.8), (torch.float32, 1, 0.5)]:
        x = torch.randn(3, 4, k_len, generator=gen, dtype=torch.float64) * 3
        x[0, 0] = -math.inf
        x[1, :, k_len // 2 + 1:] += torch.finfo(torch.float64).min
        x[2, 1] = torch.randint(-1, 2, (k_len,), generator=gen).double()
        x = x.to(dtype)
        rate = torch.rand(3, 4, 1, generator=gen) if r is None else r
        upstream = torch.randn(x.shape, generator=gen).to(dtype)
        results = []
        for path in ("torch", "triton"):
            leaf = x.clone().requires_grad_(True)
            out = r_softmax(leaf, rate, backend=path)
            (out.float() * upstream.float()).sum().backward()
            results.append((out.double(), leaf.grad.double()))
        (ref, ref_grad), (tri, tri_grad) = results
        # NOTE: the interpreter truncates float32 -> bf16 instead of rounding: one bf16 ulp of slack there.
        atol = 8e-3 if dtype == torch.bfloat16 else 1e-6
        assert (tri - ref).abs().max() <= atol, (dtype, k_len, (tri - ref).abs().max())
        scale = ref_grad.abs().amax(-1, keepdim=True) + 1
        assert ((tri_grad - ref_grad).abs() <= 20 * atol * scale).all(), (dtype, k_len)
        assert (tri[0, 0] == 0).all() and torch.isfinite(tri_grad).all()
    print("triton ok")
    """
)


def test_triton_kernel_in_the_interpreter_matches_the_reference_path():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton ok" in done.stdout


def test_reference_path_still_passes_the_operator_tests():
    # With a fused kernel present, "auto" sends tests/test_rsoftmax.py through it; rerun them on the reference path.
    env = dict(os.environ, RSOFT_BACKEND="torch", PYTHONPATH=str(ROOT))
    done = run_pytest(env, str(ROOT / "tests" / "test_rsoftmax.py"))
    assert done.returncode == 0, done.stdout[-3000:]
