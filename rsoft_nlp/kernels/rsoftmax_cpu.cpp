// Fused r-softmax for CPU tensors: forward and backward over rows of a contiguous (rows, k_len) matrix.
//
// Two implementations of the same per-row computation:
// * rsoftmax_simd.h: AVX-512 or AVX2 rows for float32 compute (float, bfloat16 and half inputs), used when the build
//   targets one of them (the Python loader builds for the best instruction set this CPU and torch support);
// * the portable rows below: float64, and every dtype on builds without AVX2.
//
// Forward, per row: one pass for the max (and the index torch.max would pick), one pass for z = x - max and
// e = exp(z), a selection of the two order statistics of the linearly interpolated r-quantile among the unmasked
// keys (e > 0), then weights relu(z + t) * e and their normalisation.
// Per-row state kept for the backward: the shift (the row max, or 0 when it is not finite), t, the normaliser and
// the max's index (-1 when the max is not finite, so that no gradient flows into it, as in the reference path).
//
// Backward, per row, with t constant: recompute e and w = relu(z + t) from the input, then
//   dz_i = (g_i - sum_j g_j p_j) / S * e_i * (1[z_i + t > 0] + w_i),  dx = dz - (sum_i dz_i) at the max's index.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "rsoftmax_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// exp for float32 with a branch-free body that the compiler vectorises. Relative error is about 1 ulp; results
// underflow gradually (subnormals, as std::exp gives) and are exactly 0 below -104, where float32 exp is 0 too.
inline float exp_acc(float x) {
  const float clamped = std::min(std::max(x, -104.0f), 0.0f);
  // Round clamped * log2(e) to the nearest integer with the 1.5 * 2^23 trick (no rounding instruction needed).
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // Cody-Waite reduction: r = clamped - n * ln2 in two parts.
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n with n in [-150, 0], split into two normal powers of two so subnormal results round only once.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni / 2;
  const int32_t bits_a = (half + 127) << 23;
  const int32_t bits_b = (ni - half + 127) << 23;
  float scale_a;
  float scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof(float));
  std::memcpy(&scale_b, &bits_b, sizeof(float));
  const float result = (p * scale_a) * scale_b;
  // -inf and anything below -104 give 0; NaN stays NaN (the comparison is false).
  return x < -104.0f ? 0.0f : (x != x ? x : result);
}

inline double exp_acc(double x) { return std::exp(x); }

constexpr int64_t kGrainRows = 16;
constexpr int kLanes = 16;

// Sum with kLanes independent partial sums, so the loop vectorises without reassociating a single chain.
template <typename acc_t>
inline acc_t lane_sum(const acc_t* values, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      part[j] += values[i + j];
    }
  }
  acc_t total = 0;
  for (; i < n; ++i) {
    total += values[i];
  }
  for (int j = 0; j < kLanes; ++j) {
    total += part[j];
  }
  return total;
}

// Max of a row converted to the compute dtype, with kLanes independent partial maxima.
template <typename scalar_t, typename acc_t>
inline acc_t lane_max(const scalar_t* values, int64_t n) {
  acc_t part[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    part[j] = -std::numeric_limits<acc_t>::infinity();
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(values[i + j]);
      part[j] = v > part[j] ? v : part[j];
    }
  }
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(values[i]);
    top = v > top ? v : top;
  }
  for (int j = 0; j < kLanes; ++j) {
    top = part[j] > top ? part[j] : top;
  }
  return top;
}

template <typename acc_t>
inline acc_t median_of_three(acc_t a, acc_t b, acc_t c) {
  return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

// Order statistics k and k + 1 (0-based; +inf for the second when k + 1 == n) of values[0, n), by quickselect with a
// three-way, branch-free partition into two scratch buffers. `values`, `spare_a` and `spare_b` each hold n slots
// and are overwritten. Ties are handled by the "equal to pivot" block, so repeated values cost no extra passes.
template <typename acc_t>
void select_pair(acc_t* values, acc_t* spare_a, acc_t* spare_b, int64_t n, int64_t k, acc_t* lo_out, acc_t* hi_out) {
  acc_t* cur = values;
  acc_t* bufs[3] = {values, spare_a, spare_b};
  int64_t m = n;
  // The smallest value known to lie above the active range (it bounds the (k + 1)-th statistic).
  acc_t above = std::numeric_limits<acc_t>::infinity();
  int rounds = 0;
  while (m > 8) {
    if (++rounds > rsoft_select::kMaxRounds) {
      rsoft_select::introselect(cur, m, k, above, lo_out, hi_out);
      return;
    }
    const acc_t pivot = median_of_three(cur[0], cur[m / 2], cur[m - 1]);
    acc_t* less = cur == bufs[0] ? bufs[1] : bufs[0];
    acc_t* more = cur == bufs[2] ? bufs[1] : bufs[2];
    int64_t n_less = 0;
    int64_t n_more = 0;
    for (int64_t i = 0; i < m; ++i) {
      const acc_t v = cur[i];
      less[n_less] = v;
      n_less += v < pivot;
      more[n_more] = v;
      n_more += v > pivot;
    }
    if (rsoft_select::narrow(pivot, less, n_less, more, n_more, &cur, &m, &k, &above, lo_out, hi_out)) {
      return;
    }
  }
  std::sort(cur, cur + m);
  *lo_out = cur[k];
  *hi_out = k + 1 < m ? cur[k + 1] : above;
}

template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* x, const acc_t* r, scalar_t* out, acc_t* stats, int64_t* argmax, int64_t rows,
                  int64_t k_len, acc_t eps) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z_buf(k_len), e_buf(k_len), pick(k_len), spare_a(k_len), spare_b(k_len);
    // Non-aliasing views, so the row loops vectorise without runtime alias checks.
    acc_t* __restrict z = z_buf.data();
    acc_t* __restrict e = e_buf.data();
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* __restrict xr = x + row * k_len;
      scalar_t* __restrict outr = out + row * k_len;

      // Pass 1: the max (a vectorised reduction), then its first index (torch.max's choice among ties).
      const acc_t top = lane_max<scalar_t, acc_t>(xr, k_len);
      int64_t top_index = 0;
      while (top_index < k_len && !(static_cast<acc_t>(xr[top_index]) == top)) {
        ++top_index;
      }
      top_index = top_index < k_len ? top_index : 0;
      const bool finite_top = std::isfinite(top);
      const acc_t shift = finite_top ? top : acc_t(0);

      // Pass 2: shifted scores and their exponentials.
      for (int64_t i = 0; i < k_len; ++i) {
        const acc_t zi = static_cast<acc_t>(xr[i]) - shift;
        z[i] = zi;
        e[i] = exp_acc(zi);
      }
      // Branch-free compaction of the unmasked keys' z into scratch.
      int64_t n = 0;
      for (int64_t i = 0; i < k_len; ++i) {
        pick[n] = z[i];
        n += e[i] > acc_t(0);
      }

      // The r-quantile of the unmasked z's, 0 when there are none.
      acc_t quantile = 0;
      if (n > 0) {
        const auto at = rsoft_select::quantile_at(n, r[row]);
        acc_t lo = 0;
        acc_t hi = 0;
        select_pair(pick.data(), spare_a.data(), spare_b.data(), n, at.rank, &lo, &hi);
        quantile = rsoft_select::interpolate(at, n, lo, hi);
      }
      const acc_t t = -quantile + eps;

      // Pass 3: weights and their sum; pass 4: normalisation.
      for (int64_t i = 0; i < k_len; ++i) {
        e[i] = std::max(z[i] + t, acc_t(0)) * e[i];
      }
      const acc_t total = lane_sum(e, k_len);
      // A fully masked row divides 0 by 1; a NaN among the scores makes the total NaN and the whole row NaN.
      const acc_t denom = total == acc_t(0) ? acc_t(1) : total;
      for (int64_t i = 0; i < k_len; ++i) {
        outr[i] = static_cast<scalar_t>(e[i] / denom);
      }
      stats[3 * row] = shift;
      stats[3 * row + 1] = t;
      stats[3 * row + 2] = total;
      argmax[row] = finite_top ? top_index : -1;
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* grad, const scalar_t* x, const acc_t* stats, const int64_t* argmax,
                   scalar_t* grad_x, int64_t rows, int64_t k_len) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> slope_buf(k_len), g_buf(k_len), gp_buf(k_len);
    // Non-aliasing views, so the row loops vectorise without runtime alias checks.
    acc_t* __restrict slope = slope_buf.data();
    acc_t* __restrict g = g_buf.data();
    acc_t* __restrict gp_terms = gp_buf.data();
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* __restrict xr = x + row * k_len;
      const scalar_t* __restrict gr = grad + row * k_len;
      scalar_t* __restrict dxr = grad_x + row * k_len;
      const acc_t shift = stats[3 * row];
      const acc_t t = stats[3 * row + 1];
      const acc_t total = stats[3 * row + 2];
      if (total == acc_t(0)) {
        for (int64_t i = 0; i < k_len; ++i) {
          dxr[i] = static_cast<scalar_t>(0);
        }
        continue;
      }

      // Pass 1: g_j p_j with p recomputed in the compute dtype, and ds_i/dz_i = e_i * (1[z_i + t > 0] + w_i).
      for (int64_t i = 0; i < k_len; ++i) {
        const acc_t zi = static_cast<acc_t>(xr[i]) - shift;
        const acc_t ei = exp_acc(zi);
        const acc_t lifted = zi + t;
        const acc_t wi = std::max(lifted, acc_t(0));
        const acc_t gi = static_cast<acc_t>(gr[i]);
        g[i] = gi;
        gp_terms[i] = gi * (wi * ei / total);
        slope[i] = ei * ((lifted > acc_t(0) ? acc_t(1) : acc_t(0)) + wi);
      }
      const acc_t gp = lane_sum(gp_terms, k_len);

      // Pass 2: dz, its sum (the max's gradient), and the result.
      for (int64_t i = 0; i < k_len; ++i) {
        slope[i] = (g[i] - gp) / total * slope[i];
      }
      const acc_t dz_sum = lane_sum(slope, k_len);
      const int64_t top = argmax[row];
      if (top >= 0) {
        slope[top] -= dz_sum;
      }
      for (int64_t i = 0; i < k_len; ++i) {
        dxr[i] = static_cast<scalar_t>(slope[i]);
      }
    }
  });
}

// The vectorised rows where the build has them and the compute dtype is float, the portable rows otherwise.
template <typename scalar_t, typename acc_t>
void run_forward(const scalar_t* x, const acc_t* r, scalar_t* out, acc_t* stats, int64_t* argmax, int64_t rows,
                 int64_t k_len, acc_t eps) {
#ifdef RSOFT_SIMD_WIDTH
  if constexpr (std::is_same_v<acc_t, float>) {
    rsoft_simd::forward_rows<scalar_t>(x, r, out, stats, argmax, rows, k_len, eps, kGrainRows);
    return;
  }
#endif
  forward_rows<scalar_t, acc_t>(x, r, out, stats, argmax, rows, k_len, eps);
}

template <typename scalar_t, typename acc_t>
void run_backward(const scalar_t* grad, const scalar_t* x, const acc_t* stats, const int64_t* argmax,
                  scalar_t* grad_x, int64_t rows, int64_t k_len) {
#ifdef RSOFT_SIMD_WIDTH
  if constexpr (std::is_same_v<acc_t, float>) {
    rsoft_simd::backward_rows<scalar_t>(grad, x, stats, argmax, grad_x, rows, k_len, kGrainRows);
    return;
  }
#endif
  backward_rows<scalar_t, acc_t>(grad, x, stats, argmax, grad_x, rows, k_len);
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& r) {
  TORCH_CHECK(x.device().is_cpu() && r.device().is_cpu(), "`scores` must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "`scores` must be 2-D (rows, k_len), got ", x.dim(), " dimensions");
  TORCH_CHECK(r.dim() == 1 && r.size(0) == x.size(0), "`r` must hold one rate per row, got shape ", r.sizes());
}

std::vector<torch::Tensor> forward(const torch::Tensor& scores, const torch::Tensor& r, double eps) {
  check_inputs(scores, r);
  const auto x = scores.contiguous();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto rates = r.to(acc_dtype).contiguous();
  auto out = torch::empty_like(x);
  auto stats = torch::empty({x.size(0), 3}, x.options().dtype(acc_dtype));
  auto argmax = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.numel() == 0) {
    stats.zero_();
    argmax.fill_(-1);
    return {out, stats, argmax};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rsoftmax_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run_forward<scalar_t, acc_t>(x.data_ptr<scalar_t>(), rates.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
                                 stats.data_ptr<acc_t>(), argmax.data_ptr<int64_t>(), x.size(0), x.size(1),
                                 static_cast<acc_t>(eps));
  });
  return {out, stats, argmax};
}

torch::Tensor backward(const torch::Tensor& grad, const torch::Tensor& scores, const torch::Tensor& stats,
                       const torch::Tensor& argmax) {
  TORCH_CHECK(grad.sizes() == scores.sizes(), "`grad` must have the shape of `scores`, got ", grad.sizes());
  const auto x = scores.contiguous();
  const auto g = grad.to(x.scalar_type()).contiguous();
  const auto state = stats.contiguous();
  const auto top = argmax.contiguous();
  auto grad_x = torch::empty_like(x);
  if (x.numel() == 0) {
    return grad_x;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rsoftmax_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run_backward<scalar_t, acc_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), state.data_ptr<acc_t>(),
                                  top.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return grad_x;
}

}  // namespace

int64_t simd_width() {
#ifdef RSOFT_SIMD_WIDTH
  return RSOFT_SIMD_WIDTH;
#else
  return 1;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Fused r-softmax forward over the rows of a (rows, k_len) tensor");
  m.def("simd_width", &simd_width, "float32 lanes per instruction of this build (1: the portable rows only)");
  m.def("backward", &backward, "Fused r-softmax backward with the threshold held constant");
}
