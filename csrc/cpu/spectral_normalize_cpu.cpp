// sn_ext::spectral_normalize_ on the CPU: one call does a layer's whole forward (power iteration, sigma,
// W / sigma or a scaled form's W g / max(sigma, f), u and v updated in place).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../matrix_view.h"
#include "common.h"
#include "power_iteration.h"

namespace sn_ext {
namespace {

// out = W * scale in the dtype's op-math type. W / sigma is the product with scale = 1 / sigma: at most one rounding
// step from torch's `weight / sigma`, and several times faster where the pass is not bound by memory.
template <typename scalar_t>
void multiply(const Matrix3d<const scalar_t>& W, at::opmath_type<scalar_t> scale, const Matrix3d<scalar_t>& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, W.lines(), grain_for(W.inner), [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const scalar_t* w = W.line(l);
      scalar_t* y = out.line(l);
      for_each_in_line(W.inner, W.s_inner, out.s_inner, [&](int64_t, int64_t a, int64_t b) {
        y[b] = static_cast<scalar_t>(static_cast<opmath_t>(w[a]) * scale);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_normalize_cpu(
    const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n, double eps, bool v_first,
    std::optional<double> coeff, const std::optional<at::Tensor>& gamma, bool /*sigma_grad: autograd's*/) {
  constexpr const char* op = "sn_ext::spectral_normalize_";
  const MatrixShape shape = check_forward_args(op, weight, u, v, dim, n, eps);
  const Scaling scaling{coeff, gamma};
  check_scaling(op, weight, scaling);
  // g = gamma coeff, read before the rounds (a CPU tensor: no synchronization).
  const double numerator = scaling.coeff_or_one() * (gamma.has_value() ? scalar_value(*gamma) : 1.0);
  const at::Tensor w3 = as_matrix3d(weight, shape);
  WeightShapedOutput out(weight, shape);
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  at::Tensor u_used = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor v_used = at::empty_like(v, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "spectral_normalize_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Matrix3d<const scalar_t> W(w3);
    Vector uu = load_vector<scalar_t>(u), vv = load_vector<scalar_t>(v);
    const opmath_t s = static_cast<opmath_t>(power_iterate(W, uu, vv, n, eps, v_first));
    *sigma.mutable_data_ptr<opmath_t>() = s;
    const opmath_t scale = scaling.scaled() ? static_cast<opmath_t>(numerator / scaling.divisor(s)) : opmath_t(1) / s;
    multiply(W, scale, Matrix3d<scalar_t>(out.view3d));
    store_vector<scalar_t>(uu, u_used);
    store_vector<scalar_t>(vv, v_used);
    if (n > 0) {  // n == 0 reads the buffers and changes nothing (a degenerate round restored uu, vv to them)
      store_vector<scalar_t>(uu, u);
      store_vector<scalar_t>(vv, v);
    }
  });
  return {out.finish(), sigma, u_used, v_used};
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CPU, m) {
  m.impl("spectral_normalize_", &spectral_normalize_cpu);
}

}  // namespace sn_ext
