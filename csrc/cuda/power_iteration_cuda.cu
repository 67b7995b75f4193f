// sn_ext::power_iteration_ on CUDA: the forward kernel of spectral_normalize_cuda.cu without the division;
// u and v change in place only if no round was degenerate.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../matrix_view.h"
#include "kernels.h"

namespace sn_ext {
namespace {

at::Tensor power_iteration_cuda(const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n,
                                double eps, bool v_first) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const MatrixShape shape = check_forward_args("sn_ext::power_iteration_", weight, u, v, dim, n, eps);
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  // The rounds run on scratch vectors: u, v change only if no round was degenerate, decided on the device.
  const int64_t groups = forward_column_groups(weight, dim);
  run_forward({{as_matrix3d(weight, shape, groups), at::Tensor(), u, v, at::empty({u.numel()}, u.options()),
                at::empty({v.numel()}, v.options()), Finish::kCommit, v_first, groups}},
              sigma, n, eps);
  return sigma;
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CUDA, m) {
  m.impl("power_iteration_", &power_iteration_cuda);
}

}  // namespace sn_ext
