// sn_ext::spectral_normalize_backward on the CPU: grad_W = (G - <G, W_sn> u v^T) / sigma in one call; and
// sn_ext::spectral_normalize_scaled_backward, the scaled forms' (bounded spectral norm, sigma-reparam).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../matrix_view.h"
#include "common.h"

namespace sn_ext {
namespace {

// <A, B> over two weight-shaped views, one partial sum per line, then added in line order (deterministic). A line's
// sum: kLanes accumulators of lane_t, as in dot_rows (the product of two values of a float dtype is exact in lane_t:
// only the sums round), added pairwise in double. Independent lanes, not one chain of dependent adds, so the loop
// runs at the speed of the loads.
template <typename scalar_t>
acc_t inner_product(const Matrix3d<const scalar_t>& A, const Matrix3d<const scalar_t>& B) {
  using lane = lane_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  Vector partial(A.lines());
  at::parallel_for(0, A.lines(), grain_for(A.inner), [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const scalar_t* a = A.line(l);
      const scalar_t* b = B.line(l);
      lane lanes[L] = {};
      const int64_t full = A.inner - A.inner % L;
      if (A.s_inner == 1 && B.s_inner == 1) {
        for (int64_t r = 0; r < full; r += L) {
#pragma omp simd
          for (int64_t k = 0; k < L; ++k) lanes[k] += lane(to_float(a[r + k])) * lane(to_float(b[r + k]));
        }
      } else {
        for (int64_t r = 0; r < full; r += L)
          for (int64_t k = 0; k < L; ++k)
            lanes[k] += lane(to_float(a[(r + k) * A.s_inner])) * lane(to_float(b[(r + k) * B.s_inner]));
      }
      for (int64_t r = full; r < A.inner; ++r)
        lanes[r - full] += lane(to_float(a[r * A.s_inner])) * lane(to_float(b[r * B.s_inner]));
      partial[l] = pairwise_sum(lanes);
    }
  });
  acc_t total = 0;
  for (acc_t value : partial) total += value;
  return total;
}

// out = (G - lambda u v^T) * scale, line by line: the operation order of every backend's backward.
template <typename scalar_t>
void correct(const Matrix3d<const scalar_t>& G, const Matrix3d<scalar_t>& out, const at::Tensor& u, const at::Tensor& v,
             at::opmath_type<scalar_t> lambda, at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Vector uu = load_vector<scalar_t>(u);
  const std::vector<opmath_t> vv = load_vector<scalar_t, opmath_t>(v);  // converted once, not once per row
  at::parallel_for(0, G.lines(), grain_for(G.inner), [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const int64_t o = l / G.rows, i = l % G.rows;
      const scalar_t* g = G.line(l);
      scalar_t* y = out.line(l);
      const opmath_t lambda_u = lambda * static_cast<opmath_t>(uu[i]);
      const opmath_t* vo = vv.data() + o * G.inner;
      for_each_in_line(G.inner, G.s_inner, out.s_inner, [&](int64_t r, int64_t a, int64_t b) {
        const opmath_t corrected = static_cast<opmath_t>(g[a]) - lambda_u * vo[r];
        y[b] = static_cast<scalar_t>(corrected * scale);
      });
    }
  });
}

at::Tensor spectral_normalize_backward_cpu(const at::Tensor& grad, const at::Tensor& weight_sn, const at::Tensor& u,
                                           const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const MatrixShape shape =
      check_backward_args("sn_ext::spectral_normalize_backward", grad, weight_sn, u, v, sigma, dim);
  const at::Tensor g3 = as_matrix3d(grad, shape), s3 = as_matrix3d(weight_sn, shape);
  WeightShapedOutput grad_weight(weight_sn, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight_sn.scalar_type(), "spectral_normalize_backward", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const Matrix3d<const scalar_t> G(g3), S(s3);
        const opmath_t lambda = static_cast<opmath_t>(inner_product(G, S));
        correct(G, Matrix3d<scalar_t>(grad_weight.view3d), u, v, lambda, opmath_t(1) / sigma.item<opmath_t>());
      });
  return grad_weight.finish();
}

// The scaled forms' backward (csrc/sn_ext.cpp): mu = <G, W> / max(sigma, f), grad_W = (G - k mu u v^T) s,
// grad_gamma = mu c, the sums as spectral_normalize_backward's.
std::tuple<at::Tensor, at::Tensor> spectral_normalize_scaled_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
    int64_t dim, std::optional<double> coeff, const std::optional<at::Tensor>& gamma, bool sigma_grad) {
  const Scaling scaling{coeff, gamma};
  const MatrixShape shape =
      check_scaled_backward_args("sn_ext::spectral_normalize_scaled_backward", grad, weight, u, v, sigma, dim, scaling);
  const at::Tensor g3 = as_matrix3d(grad, shape), w3 = as_matrix3d(weight, shape);
  WeightShapedOutput grad_weight(weight, shape);
  const at::ScalarType acc = sigma_dtype(weight.scalar_type());
  at::Tensor grad_gamma = gamma.has_value() ? at::empty_like(*gamma, at::MemoryFormat::Contiguous)
                                            : at::empty({}, weight.options().dtype(acc));
  const double sig = scalar_value(sigma);
  const double divisor = scaling.divisor(sig);
  const double numerator = scaling.coeff_or_one() * (gamma.has_value() ? scalar_value(*gamma) : 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "spectral_normalize_scaled_backward", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const Matrix3d<const scalar_t> G(g3), W(w3);
        const acc_t mu = inner_product(G, W) / divisor;
        const opmath_t lambda = scaling.counts(sig, sigma_grad) ? static_cast<opmath_t>(mu) : opmath_t(0);
        correct(G, Matrix3d<scalar_t>(grad_weight.view3d), u, v, lambda, static_cast<opmath_t>(numerator / divisor));
        set_scalar_value(grad_gamma, mu * scaling.coeff_or_one());
      });
  return {grad_weight.finish(), grad_gamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CPU, m) {
  m.impl("spectral_normalize_backward", &spectral_normalize_backward_cpu);
  m.impl("spectral_normalize_scaled_backward", &spectral_normalize_scaled_backward_cpu);
}

}  // namespace sn_ext
