// sn_ext::power_iteration_ on the CPU: n rounds of power iteration, u and v updated in place; returns sigma.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../matrix_view.h"
#include "power_iteration.h"

namespace sn_ext {
namespace {

at::Tensor power_iteration_cpu(const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n,
                               double eps, bool v_first) {
  const at::Tensor w3 = as_matrix3d(weight, check_forward_args("sn_ext::power_iteration_", weight, u, v, dim, n, eps));
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "power_iteration_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Vector uu = load_vector<scalar_t>(u), vv = load_vector<scalar_t>(v);
    const acc_t s = power_iterate(Matrix3d<const scalar_t>(w3), uu, vv, n, eps, v_first);
    *sigma.mutable_data_ptr<opmath_t>() = static_cast<opmath_t>(s);
    store_vector<scalar_t>(uu, u);
    store_vector<scalar_t>(vv, v);
  });
  return sigma;
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CPU, m) {
  m.impl("power_iteration_", &power_iteration_cpu);
}

}  // namespace sn_ext
